"""Celery: instrument in ``worker_process_init``, in each prefork child, not in the parent.

Run it (from this directory, with poolwatch, celery and sqlalchemy installed; the broker is
kombu's filesystem transport, so nothing else has to run):

    celery -A tasks worker --pool=prefork --concurrency=2 -O fair --loglevel=INFO
    python -c "import tasks; print(tasks.pool_report.delay().get(timeout=10))"

Why each child: with the prefork pool the worker's main process only receives messages and
hands them to child processes, which run the tasks — the pools worth watching are the
children's. ``worker_process_init`` is sent in every child as it starts (again for the
children that replace others, e.g. with ``--max-tasks-per-child``). Instrumenting there gives
every child its own poolwatch, with its own exporter identity and its own Prometheus port
if you want one (a child cannot serve a port its parent holds), and creates the child's
engine after the fork, so that no connection opened by the parent is ever shared. (Were the
parent instrumented — ``poolwatch run -- celery ...`` does — poolwatch's fork handling would
still start each child from zero; ``instrument()`` here then just returns that handle.)

``worker_process_init`` is not sent by the solo, threads, gevent and eventlet pools: for
those, instrument in ``worker_init`` (their tasks run in the worker's own process).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import Celery
from celery.signals import worker_process_init

import poolwatch

_DATA = Path(os.environ.get("CELERY_EXAMPLE_DIR", "celery-example-data")).absolute()

app = Celery("tasks")
app.conf.update(
    broker_url="filesystem://",
    broker_transport_options={
        "data_folder_in": str(_DATA / "broker"),
        "data_folder_out": str(_DATA / "broker"),
        "processed_folder": str(_DATA / "processed"),
        "control_folder": str(_DATA / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    },
    broker_connection_retry_on_startup=True,
    result_backend=f"file://{_DATA / 'results'}",
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)
for folder in ("broker", "processed", "control", "results"):
    (_DATA / folder).mkdir(parents=True, exist_ok=True)

engine: sa.Engine | None = None
"""This child's engine, created in ``worker_process_init`` (None in the main process)."""


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    global engine
    poolwatch.instrument()  # settings from the environment: OTEL_*, POOLWATCH_*
    engine = sa.create_engine(os.environ.get("DATABASE_URL", f"sqlite:///{_DATA / 'app.db'}"))


@app.task(name="tasks.pool_report")
def pool_report(hold: float = 0.0) -> dict[str, Any]:
    """Use this child's engine once, then report the child's pid and its pools."""
    assert engine is not None, "worker_process_init did not run: not a prefork child"
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    time.sleep(hold)  # lets a caller keep both children busy at once
    return {
        "pid": os.getpid(),
        "parent_pid": os.getppid(),
        "pools": [dataclasses.asdict(pool) for pool in poolwatch.pools()],
    }
