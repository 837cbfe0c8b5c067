"""The server's side of a PostgreSQL test: its own count of backends, and ending them.

A psycopg connection of its own (autocommit), made outside every pool poolwatch hooks, so
that what it sees and does is the server's truth, not the pools'.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tests.support.postgres import PostgresCluster


def dsn(pg: PostgresCluster, **query: str) -> str:
    """A libpq URL for ``pg`` with the credentials (what an application would configure)."""
    extra = "&".join(f"{k}={v}" for k, v in query.items())
    base = f"postgresql://{pg.user}:{pg.password}@{pg.host}:{pg.port}/{pg.dbname}"
    return f"{base}?{extra}" if extra else base


def pool_name(pg: PostgresCluster) -> str:
    """The name poolwatch derives for a pool of ``pg``: no user, no password."""
    return f"postgresql://{pg.host}:{pg.port}/{pg.dbname}"


class Admin:
    """The server's view: backends by application name, and ``pg_terminate_backend``."""

    def __init__(self, pg: PostgresCluster) -> None:
        import psycopg

        self._lock = threading.Lock()
        self._conn: Any = psycopg.connect(dsn(pg), autocommit=True)

    def backends(self, app_name: str) -> int:
        """Backends whose client set ``application_name`` to ``app_name``."""
        with self._lock:
            row = self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            ).fetchone()
        assert row is not None
        return int(row[0])

    def pids(self, app_name: str) -> set[int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,)
            ).fetchall()
        return {int(row[0]) for row in rows}

    def terminate(self, pid: int) -> None:
        """End backend ``pid`` and wait until the server has (bounded: 10 s)."""
        with self._lock:
            row = self._conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        assert row == (True,), f"backend {pid} not terminated"
        deadline = time.monotonic() + 10
        while not self.gone(pid):
            assert time.monotonic() < deadline, f"backend {pid} still there"
            time.sleep(0.005)

    def gone(self, pid: int) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
        return row == (0,)

    def close(self) -> None:
        self._conn.close()
