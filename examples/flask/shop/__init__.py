"""Flask: instrument in the app factory; a SQLAlchemy engine on SQLite.

Run it (from ``examples/flask``, with poolwatch, flask and sqlalchemy installed):

    flask --app shop run --host 127.0.0.1 --port 5000
    curl -X POST 127.0.0.1:5000/orders ; curl 127.0.0.1:5000/health/pools

or under a production server, e.g. ``gunicorn 'shop:create_app()'``.

Why the factory: ``create_app()`` is where a Flask application is assembled, once in each
process that serves it (the development server, each gunicorn or uWSGI worker when the app
is not preloaded), and never merely by importing the package — tests and scripts that
import ``shop`` do not start exporters. ``instrument()`` comes first, so that the engine
created below is hooked from its birth and named after this file. It is idempotent: a
second ``create_app()`` in the same process (tests often make several) reuses it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import sqlalchemy as sa
from flask import Flask, current_app

import poolwatch


def create_app() -> Flask:
    poolwatch.instrument()  # settings from the environment: OTEL_*, POOLWATCH_*
    app = Flask(__name__)
    url = os.environ.get("DATABASE_URL", "sqlite:///flask-example.db")
    engine = sa.create_engine(url)
    with engine.begin() as conn:  # one checkout at start-up: the schema
        conn.execute(
            sa.text("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
        )
    app.extensions["engine"] = engine

    @app.post("/orders")
    def create_order() -> dict[str, int]:
        with _engine().begin() as conn:  # one checkout per request
            result = conn.execute(sa.text("INSERT INTO orders (item) VALUES ('widget')"))
            return {"id": int(result.lastrowid or 0)}

    @app.get("/health/pools")
    def health_pools() -> list[dict[str, Any]]:
        return [dataclasses.asdict(pool) for pool in poolwatch.pools()]

    return app


def _engine() -> sa.Engine:
    engine: sa.Engine = current_app.extensions["engine"]
    return engine
