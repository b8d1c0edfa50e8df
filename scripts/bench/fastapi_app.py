"""The HTTP baseline of `scripts/bench.sh http`: the stack Kobe replaces, a FastAPI app that hands
each submission to Celery (publisher confirms on, Redis results), as such apps are usually written:
a plain `def` endpoint, run in FastAPI's thread pool, calling `send_task`.

    uvicorn fastapi_app:app --port 8001      (with celery_drain.py's worker consuming the queue)
"""

import os

from celery import Celery
from fastapi import FastAPI
from pydantic import BaseModel

BROKER = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//").replace("%2f", "")
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ["KOBE_BENCH_CELERY_QUEUE"]

celery_app = Celery("fastapi_app", broker=BROKER, backend=REDIS)
celery_app.conf.update(
    task_acks_late=True,
    broker_transport_options={"confirm_publish": True},
    result_backend_transport_options={"global_keyprefix": f"{QUEUE}:"},
    task_default_queue=QUEUE,
)
app = FastAPI()


class TaskStart(BaseModel):
    task_name: str
    args: list = []
    kwargs: dict = {}


@app.post("/task/start", status_code=202)
def start(body: TaskStart):
    result = celery_app.send_task(body.task_name, args=body.args, kwargs=body.kwargs, queue=QUEUE)
    return {"task_id": result.id}
