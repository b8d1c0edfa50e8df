"""A Python Celery 5 worker's tasks for Kobe's mixed-fleet tests (tests/integration/celery.rs), on
the test's own queue. Kobe declares them `kind = "celery"`, records and publishes them, and
tracks their outcome from the events this worker sends (`celery -A worker worker -E`).

    py_mul(a, b)   {"product": a * b, "factors": {a: b}} (an int key: JSON and repr differ)
    py_fail()      raises ValueError("no such page")

Each run appends its task id to $PEER_RUNS, so the test counts executions.
Settings come from the environment: RABBITMQ_URL, KOBE_AMQP_PREFIX, KOBE_CELERY_RESULTS.
"""

import os

from celery import Celery
from kombu import Exchange, Queue

PREFIX = os.environ["KOBE_AMQP_PREFIX"]
app = Celery("worker", broker=os.environ["RABBITMQ_URL"], backend=os.environ["KOBE_CELERY_RESULTS"])
# Kobe's queue and exchange exist already, with arguments of Kobe's: never redeclare them.
app.conf.task_queues = [
    Queue(
        f"{PREFIX}.py",
        Exchange(f"{PREFIX}.tasks", type="direct", no_declare=True),
        routing_key="py",
        no_declare=True,
    )
]
app.conf.worker_send_task_events = True
app.conf.task_acks_late = True
app.conf.broker_connection_retry_on_startup = True


def ran(request):
    with open(os.environ["PEER_RUNS"], "a") as runs:
        runs.write(request.id + "\n")


@app.task(bind=True, name="py_mul")
def py_mul(self, a, b):
    ran(self.request)
    return {"product": a * b, "factors": {a: b}}


@app.task(bind=True, name="py_fail")
def py_fail(self):
    ran(self.request)
    raise ValueError("no such page")
