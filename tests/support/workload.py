"""A workload that exhausts a real pool, for the end-to-end test.

    python -m tests.support.workload --url URL --port-file FILE --seconds 90

Instruments itself with poolwatch, serves the Prometheus endpoint on a free loopback port
(written to ``--port-file``), and runs cycles against a SQLAlchemy engine with pool_size=2,
max_overflow=1, pool_timeout=0.1: each cycle four callers want a connection at once, so
one times out, three hold theirs, and when they all return the overflow connection finds
the pool full and is discarded. The pool is full most of the time. It stops after
``--seconds`` (bounded: at most 300) or on SIGTERM.
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
from sqlalchemy import exc

import poolwatch

CALLERS = 4
HOLD = 0.3


def _cycle(engine: sa.Engine) -> None:
    start = threading.Barrier(CALLERS)

    def caller() -> None:
        start.wait()
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                time.sleep(HOLD)
        except exc.TimeoutError:
            pass  # the point of the exercise: the exhaustion is what poolwatch reports

    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args()
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    handle = poolwatch.instrument(prometheus_port=0)
    try:
        engine = sa.create_engine(args.url, pool_size=2, max_overflow=1, pool_timeout=0.1)
        poolwatch.track(engine, name="orders-db")
        assert handle.prometheus_address is not None
        args.port_file.write_text(str(handle.prometheus_address[1]))
        deadline = time.monotonic() + min(args.seconds, 300.0)
        while not stop.is_set() and time.monotonic() < deadline:
            _cycle(engine)
        engine.dispose()
    finally:
        poolwatch.uninstrument()
    return 0


if __name__ == "__main__":
    sys.exit(main())
