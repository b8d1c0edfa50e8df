"""The Celery baseline of `scripts/bench.sh canvas`: Celery's canvas on the same broker and
Redis, configured as `celery_drain.py` is (prefork x concurrency, acks_late, prefetch 1,
publisher confirms, Redis results; a chord needs a result backend).

Starts one `celery worker` on its own queue, then times, from the client's call to the
callback's result: a chord of N no-op members and a callback, and a chain of M no-op steps.
Prints `key=value` lines for bench.sh.

    python celery_canvas.py --members 1000 --steps 100 --concurrency 10
"""

import argparse
import os
import subprocess
import sys
import time

from celery import chain, chord, group

from celery_common import make_app

PREFIX = f"kobebench-canvas-{os.getpid()}"
QUEUE = os.environ.get("KOBE_BENCH_CELERY_QUEUE", PREFIX)

app = make_app("celery_canvas", QUEUE)


@app.task(name="noop")
def noop(*args):
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_canvas", "worker", "-Q", QUEUE,
         "-c", str(args.concurrency), "-P", "prefork", "--prefetch-multiplier", "1",
         "--without-heartbeat", "--without-mingle", "--without-gossip", "--loglevel", "WARNING"],
        cwd=here, env={**os.environ, "KOBE_BENCH_CELERY_QUEUE": QUEUE},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # The worker is up once it answers a task.
        noop.apply_async(queue=QUEUE).get(timeout=120)
        started = time.time()
        chord(group(noop.s() for _ in range(args.members)))(noop.s()).get(timeout=900)
        print(f"celery_chord_s={time.time() - started:.3f}")
        started = time.time()
        chain(*[noop.s() for _ in range(args.steps)])().get(timeout=900)
        print(f"celery_chain_s={time.time() - started:.3f}")
    finally:
        worker.terminate()
        worker.wait(timeout=60)


if __name__ == "__main__":
    main()
