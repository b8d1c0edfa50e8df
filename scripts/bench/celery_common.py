"""What the Celery baselines share: the broker and Redis they use, and an app configured with
care (acks_late, prefetch multiplier 1, publisher confirms, Redis results under a key prefix of
the run's own)."""

import os

from celery import Celery

BROKER = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//").replace("%2f", "")
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def make_app(name, queue):
    app = Celery(name, broker=BROKER, backend=REDIS)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"confirm_publish": True},
        result_backend_transport_options={"global_keyprefix": f"{queue}:"},
        task_default_queue=queue,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    return app
