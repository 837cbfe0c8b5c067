"""A WSGI app served by gunicorn with ``preload_app = True`` (see gunicorn.conf.py).

Run it (from this directory, with poolwatch, gunicorn and sqlalchemy installed):

    gunicorn -c gunicorn.conf.py app:application
    curl 127.0.0.1:8000/work ; curl 127.0.0.1:8000/health/pools

Preloading imports this module once, in gunicorn's master, before the workers are forked:
the engine below and the schema set-up run there. The connection the set-up opened is
closed again before each fork (``pre_fork`` in gunicorn.conf.py), so that no worker inherits
a connection it would share with the master or with its siblings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import sqlalchemy as sa

import poolwatch

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite:///gunicorn-example.db")

engine = sa.create_engine(DATABASE_URL)
with engine.begin() as _conn:  # one checkout in the master: the schema
    _conn.execute(sa.text("CREATE TABLE IF NOT EXISTS hits (id INTEGER PRIMARY KEY, pid INT)"))

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/work":
        hold = float(parse_qs(environ.get("QUERY_STRING", "")).get("hold", ["0"])[0])
        with engine.begin() as conn:  # one checkout per request
            conn.execute(sa.text("INSERT INTO hits (pid) VALUES (:pid)"), {"pid": os.getpid()})
        time.sleep(min(hold, 2.0))  # lets a caller keep both workers busy at once
        return _json(start_response, _report())
    if path == "/health/pools":
        return _json(start_response, _report())
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found\n"]


def _report() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "pools": [dataclasses.asdict(pool) for pool in poolwatch.pools()],
    }


def _json(start_response: StartResponse, body: object) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
