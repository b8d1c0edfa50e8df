"""Bulk submission and the drain of what it sent, for scripts/bench.sh bulk.

Posts N no-op tasks to POST /task/start_many in batches (two clients at once), with no worker
consuming, and reports accepted tasks/s; then starts `kobe worker` and reports the drain of those
tasks from their outcomes' own times (as the worker benchmark does).

Usage: bulk.py BASE_URL MONGODB_URI DB N BATCH -- WORKER_COMMAND...
"""

import json
import subprocess
import sys
import threading
import time
import urllib.request

import pymongo


def post(base, tasks):
    body = json.dumps({"tasks": tasks}).encode()
    request = urllib.request.Request(
        f"{base}/task/start_many", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)["results"]


def main():
    base, uri, db_name, n, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    worker_command = sys.argv[sys.argv.index("--") + 1:]
    task = {"task_name": "demo_long_io", "kwargs": {"duration_ms": 0}}
    batches = [[task] * batch for _ in range(n // batch)]
    accepted, refused = [0], [0]
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if not batches:
                    return
                mine = batches.pop()
            results = post(base, mine)
            ok = sum(1 for r in results if r["status"] == 202)
            with lock:
                accepted[0] += ok
                refused[0] += len(results) - ok

    post(base, [task])  # warm up: connections, the first batch
    started = time.time()
    clients = [threading.Thread(target=client) for _ in range(2)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    elapsed = time.time() - started
    print(f"bulk_accepted_per_s={accepted[0] / elapsed:.0f}")
    print(f"bulk_refused={refused[0]}")

    # Each attempt's outcome is an insert beside its lease (`at`: when it was recorded).
    tasks = pymongo.MongoClient(uri)[db_name]["TaskLeases"]
    worker = subprocess.Popen(worker_command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        total = accepted[0] + 1
        deadline = time.time() + 900
        while tasks.count_documents({"state": "SUCCESS"}) < total:
            if time.time() > deadline:
                sys.exit("the drain did not finish in 15 minutes")
            time.sleep(0.5)
        span = list(tasks.aggregate([
            {"$match": {"state": "SUCCESS"}},
            {"$group": {"_id": None, "first": {"$min": "$at"}, "last": {"$max": "$at"}}},
        ]))[0]
        seconds = max((span["last"] - span["first"]).total_seconds(), 1e-3)
        print(f"bulk_drain_per_s={(total - 1) / seconds:.0f}")
    finally:
        worker.terminate()
        worker.wait(timeout=60)


if __name__ == "__main__":
    main()
