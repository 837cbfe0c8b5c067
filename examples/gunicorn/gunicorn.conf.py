"""gunicorn settings: the app is preloaded in the master, poolwatch instrumented per worker.

Where to call ``poolwatch.instrument()`` with ``preload_app = True``? Both places work — the
tests/test_integrations.py gunicorn tests run this file both ways and each worker reports
exactly its own checkouts:

* in ``post_fork`` (what this file does): each worker instruments itself as it starts.
  The master, which serves no request, runs no poolwatch thread and no exporter, and the
  worker's poolwatch is configured in the worker — e.g. its own Prometheus port
  (POOLWATCH_PROMETHEUS_PORT per worker), which a master-instrumented process cannot give
  its workers (a forked worker does not serve the master's port). Engines the preloaded
  app created in the master are found by ``instrument()`` and hooked from then on.
* in the master (at import of the preloaded app, or ``poolwatch run -- gunicorn ...``):
  poolwatch's fork handling resets every pool's counters in each forked worker and gives
  the worker an exporter identity of its own; the ``instrument()`` below then returns that
  same handle. Prometheus is served by the master only: export over OTLP.

Either way, close the master's connections before forking (``pre_fork``): a connection
inherited by several processes is one socket written by all of them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import poolwatch

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
preload_app = True


def pre_fork(server: Any, worker: Any) -> None:
    """In the master, before each fork: close the connections the preloaded app opened."""
    app = sys.modules.get("app")
    if app is not None:
        app.engine.dispose()


def post_fork(server: Any, worker: Any) -> None:
    """In each new worker: instrument this process (settings from OTEL_*, POOLWATCH_*)."""
    poolwatch.instrument()
