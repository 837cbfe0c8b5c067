"""One member of the fleet simulation (tests/test_fleet.py): a process holding a known
number of connections to a real PostgreSQL, and serving poolwatch's Prometheus endpoint.

    python -m tests.support.fleet --url URL --port-file FILE --pool-size 2 --max-overflow 2 \
        --used 2 --idle 1 [--waiting 1] [--http-url URL] --seconds 120

poolwatch is configured from the environment as a deployment would configure it
(``POOLWATCH_SERVER_LIMITS`` among others, set by the test). The process then:

* checks ``--used`` + ``--idle`` connections out of a SQLAlchemy engine on ``--url``
  (``pool_size``, ``max_overflow`` as given, so the pool's limit is their sum) and returns
  ``--idle`` of them, which the pool keeps open and idle;
* starts ``--waiting`` threads that ask the engine for a connection when it has none left
  (``--used`` = the limit, ``--idle`` 0), and so wait for as long as the process runs;
* with ``--http-url``, makes one request with an httpx Client that has no connection limit,
  which keeps its connection open, idle, to that server;

and only then writes its Prometheus port to ``--port-file``: from then on its levels do not
change. It stops on SIGTERM, or after ``--seconds`` (bounded: at most 300).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import sqlalchemy as sa

import poolwatch

MAX_SECONDS = 300.0


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--port-file", required=True, type=Path)
    parser.add_argument("--pool-size", type=int, required=True)
    parser.add_argument("--max-overflow", type=int, required=True)
    parser.add_argument("--used", type=int, required=True)
    parser.add_argument("--idle", type=int, default=0)
    parser.add_argument("--waiting", type=int, default=0)
    parser.add_argument("--http-url")
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    deadline = time.monotonic() + min(args.seconds, MAX_SECONDS)

    handle = poolwatch.instrument(prometheus_port=0)  # the rest from POOLWATCH_* variables
    assert handle.prometheus_address is not None
    engine = sa.create_engine(
        args.url,
        pool_size=args.pool_size,
        max_overflow=args.max_overflow,
        pool_timeout=MAX_SECONDS,  # waiters wait for as long as the process runs
    )
    held = [engine.connect() for _ in range(args.used + args.idle)]
    for connection in held[args.used :]:
        connection.close()  # back to the pool: open and idle
    for _ in range(args.waiting):
        threading.Thread(target=engine.connect, daemon=True).start()
    client = None
    if args.http_url:
        import httpx

        client = httpx.Client(
            base_url=args.http_url, limits=httpx.Limits(max_connections=None), timeout=10
        )
        client.get("/").raise_for_status()  # its connection stays open, idle
    settled = time.monotonic() + 10
    while time.monotonic() < settled:  # the waiters are waiting: the levels are final
        [database] = [p for p in handle.pools() if p.kind == "sqlalchemy"]
        if database.pending == args.waiting:
            break
        time.sleep(0.05)
    args.port_file.write_text(str(handle.prometheus_address[1]))
    try:
        while time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if client is not None:
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
