"""The Celery baseline of `scripts/bench.sh compare`: the stack Kobe replaces, configured with
care (prefork x concurrency, acks_late, prefetch multiplier 1, publisher confirms, Redis results).

Pre-loads N no-op tasks into its own queue with the Celery client, starts one `celery worker`,
and measures how fast it drains them and the peak resident memory of all its processes. Prints
`key=value` lines for bench.sh.

    python celery_drain.py --tasks 3000 --concurrency 10
"""

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import redis
from celery_common import REDIS, make_app

PREFIX = f"kobebench-celery-{os.getpid()}"
QUEUE = os.environ.get("KOBE_BENCH_CELERY_QUEUE", PREFIX)

app = make_app("celery_drain", QUEUE)


@app.task(name="noop")
def noop():
    return None


def tree_rss_kib(pid):
    """Resident memory of a process and all its descendants (prefork children included)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_of(names):
    """CPU seconds of every process named one of `names`, waited-for children included."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() not in names:
                    continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15]) / ticks
        except (OSError, ValueError, IndexError):
            continue
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    r = redis.Redis.from_url(REDIS)

    started = time.time()
    for _ in range(args.tasks):
        noop.apply_async(queue=QUEUE)
    preload_s = time.time() - started

    here = os.path.dirname(os.path.abspath(__file__))
    broker_before, redis_before = cpu_of({"beam.smp"}), cpu_of({"redis-server"})
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_drain", "worker", "-Q", QUEUE,
         "-c", str(args.concurrency), "-P", "prefork", "--prefetch-multiplier", "1",
         "--without-heartbeat", "--without-mingle", "--without-gossip", "--loglevel", "WARNING"],
        cwd=here, env={**os.environ, "KOBE_BENCH_CELERY_QUEUE": QUEUE},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pattern = f"{QUEUE}:celery-task-meta-*"

    def done():
        return sum(1 for _ in r.scan_iter(match=pattern, count=5000))

    # Polling is kept light (two cores are shared with the broker and the worker); the drain
    # rate comes from the results' own `date_done` times, not from when polling noticed them.
    peak = 0
    deadline = time.time() + 900
    try:
        while True:
            peak = max(peak, tree_rss_kib(worker.pid))
            if done() >= args.tasks:
                break
            if time.time() > deadline:
                sys.exit(f"celery drained {done()} of {args.tasks} in 15 minutes")
            time.sleep(0.5)
        times = []
        for key in r.scan_iter(match=pattern, count=5000):
            meta = json.loads(r.get(key))
            times.append(datetime.datetime.fromisoformat(meta["date_done"]).timestamp())
    finally:
        peak = max(peak, tree_rss_kib(worker.pid))
        broker_cpu = cpu_of({"beam.smp"}) - broker_before
        redis_cpu = cpu_of({"redis-server"}) - redis_before
        worker.terminate()
        worker.wait(timeout=60)
        for key in r.scan_iter(match=f"{QUEUE}:*", count=5000):
            r.delete(key)
        with app.connection() as conn:
            conn.default_channel.queue_delete(QUEUE)
    rate = (len(times) - 1) / max(max(times) - min(times), 1e-6)
    print(f"celery_preload_per_s={args.tasks / preload_s:.0f}")
    print(f"celery_drain_per_s={rate:.0f}")
    print(f"celery_peak_rss_kib={peak}")
    # The worker's processes (its prefork children roll up into it once waited for), and the
    # broker's and Redis's over the drain, per task.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"celery_cpu_us_per_task={(usage.ru_utime + usage.ru_stime) * 1e6 / args.tasks:.0f}")
    print(f"celery_broker_cpu_us_per_task={broker_cpu * 1e6 / args.tasks:.0f}")
    print(f"celery_redis_cpu_us_per_task={redis_cpu * 1e6 / args.tasks:.0f}")


if __name__ == "__main__":
    main()
