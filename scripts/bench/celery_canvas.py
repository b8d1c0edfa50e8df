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

from celery import Celery, chain, chord, group

PREFIX = f"kobebench-canvas-{os.getpid()}"
BROKER = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//").replace("%2f", "")
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("KOBE_BENCH_CELERY_QUEUE", PREFIX)

app = Celery("celery_canvas", broker=BROKER, backend=REDIS)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"confirm_publish": True},
    result_backend_transport_options={"global_keyprefix": f"{QUEUE}:"},
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


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
