"""Celery's side of Kobe's mixed-fleet tests (tests/integration/celery.rs): a Python Celery 5 client
on the test's own queues, as a team moving to Kobe would run one.

    peer.py call NAME ARGS_JSON    send NAME(*ARGS) to Kobe's default queue, then AsyncResult.get()
    peer.py get TASK_ID            AsyncResult(TASK_ID).get() of a task sent some other way

Each prints one JSON line: the state, and the result or the exception and traceback Python got.
Settings come from the environment: RABBITMQ_URL, KOBE_AMQP_PREFIX, KOBE_CELERY_RESULTS.
"""

import json
import os
import sys

from celery import Celery
from kombu import Exchange, Queue

PREFIX = os.environ["KOBE_AMQP_PREFIX"]
app = Celery("peer", broker=os.environ["RABBITMQ_URL"], backend=os.environ["KOBE_CELERY_RESULTS"])
# Kobe's queue and exchange exist already, with arguments of Kobe's: never redeclare them.
app.conf.task_queues = [
    Queue(
        f"{PREFIX}.default",
        Exchange(f"{PREFIX}.tasks", type="direct", no_declare=True),
        routing_key="default",
        no_declare=True,
    )
]
app.conf.task_default_queue = f"{PREFIX}.default"
app.conf.result_extended = True
app.conf.broker_connection_retry_on_startup = True


def outcome(result, timeout):
    try:
        value = result.get(timeout=timeout)
        out = {"state": result.state, "result": value}
    except Exception as error:  # what a caller's except clause would see
        out = {
            "state": result.state,
            "error": type(error).__name__,
            "message": str(error),
            "traceback": result.traceback,
        }
    out["ready"] = result.ready()
    out["worker"] = getattr(result, "worker", None)
    out["name"] = getattr(result, "name", None)
    return out


def main():
    command, argument = sys.argv[1], sys.argv[2]
    timeout = float(os.environ.get("PEER_TIMEOUT", "30"))
    if command == "call":
        result = app.send_task(argument, args=json.loads(sys.argv[3]))
        out = outcome(result, timeout)
        out["task_id"] = result.id
    elif command == "get":
        out = outcome(app.AsyncResult(argument), timeout)
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
