"""Kobe's side of `scripts/bench.sh canvas`: against a running `kobe serve` and worker, times
from POST /workflow/start to the workflow's SUCCESS: a chord of N no-op members and a callback,
and a chain of M no-op steps. Also the chord's join: from the last member's finish to the
callback's start, from the tasks' own times in MongoDB. Prints `key=value` lines.

    python canvas.py http://127.0.0.1:8000 MONGODB_URI DB --members 1000 --steps 100
"""

import argparse
import json
import time
import urllib.error
import urllib.request

import pymongo


def post(base, path, body):
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as error:
        raise SystemExit(f"POST {path}: {error.code} {error.read().decode()}")


def get(base, path):
    with urllib.request.urlopen(base + path, timeout=60) as answer:
        return json.load(answer)


def run(base, workflow):
    started = time.time()
    workflow_id = post(base, "/workflow/start", {"workflow": workflow})["workflow_id"]
    deadline = started + 900
    while True:
        view = get(base, f"/workflow/{workflow_id}")
        if view["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            break
        if time.time() > deadline:
            raise SystemExit(f"workflow {workflow_id} did not end in 900 s")
        time.sleep(0.02)
    if view["state"] != "SUCCESS":
        raise SystemExit(f"workflow {workflow_id} ended {view['state']}: {view.get('reason')}")
    return time.time() - started, view


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("mongodb_uri")
    parser.add_argument("db")
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    noop = {"task_name": "demo_long_io", "kwargs": {"duration_ms": 0}}
    chord_s, view = run(args.base, {"chain": [{"group": [noop] * args.members}, noop]})
    # Each attempt's outcome is an insert beside its lease (`_id` = task id:attempt/outcome).
    outcomes = pymongo.MongoClient(args.mongodb_uri)[args.db]["TaskLeases"]
    ids = [s["task_id"] for s in view["steps"]]
    found = {o["task_id"]: o for o in outcomes.find({"_id": {"$in": [f"{i}:0/outcome" for i in ids]}}, {"task_id": 1, "at": 1, "started_at": 1})}
    last_member = max(found[i]["at"] for i in ids[:-1])
    callback = found[ids[-1]]["started_at"]
    print(f"kobe_chord_s={chord_s:.3f}")
    print(f"kobe_chord_join_ms={(callback - last_member).total_seconds() * 1000:.0f}")
    chain_s, _ = run(args.base, {"chain": [noop] * args.steps})
    print(f"kobe_chain_s={chain_s:.3f}")


if __name__ == "__main__":
    main()
