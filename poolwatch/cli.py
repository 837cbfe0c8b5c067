"""The ``poolwatch`` command.

``poolwatch demo`` runs the main job on an embedded default: a SQLAlchemy workload on a
throw-away SQLite database (or the database ``--url`` names), instrumented by poolwatch,
with the Prometheus endpoint served on 127.0.0.1 and the live pool table printed every
second. ``--scenario exhaustion`` makes the pool really run out (callers time out),
``healthy`` keeps it comfortable.

Exit codes: 0 done, 1 a runtime failure (the message says which), 2 bad usage.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import poolwatch
from poolwatch._version import __version__


@dataclass(frozen=True)
class Scenario:
    """Pool settings and workload shape of one demo scenario."""

    pool_size: int
    max_overflow: int
    pool_timeout: float
    hold: tuple[float, float]
    """Seconds a worker holds its connection: uniform between these."""
    pause: tuple[float, float]
    """Seconds a worker waits between requests."""
    description: str


SCENARIOS = {
    "healthy": Scenario(5, 5, 2.0, (0.001, 0.01), (0.01, 0.05), "a pool with room to spare"),
    "exhaustion": Scenario(
        2, 0, 0.2, (0.2, 0.5), (0.0, 0.01), "2 connections for 8 busy workers: callers time out"
    ),
}


def _bar(used: int, limit: int | None, width: int = 10) -> str:
    if not limit:
        return " " * width
    filled = min(width, round(width * used / limit))
    return "#" * filled + "." * (width - filled)


def render(snapshots: Sequence[poolwatch.PoolSnapshot]) -> str:
    """The pool table the demo prints."""
    header = (
        f"{'POOL':<44} {'KIND':<10} {'USED/MAX':>9} {'UTIL':<10} {'IDLE':>4} {'PEND':>4} "
        f"{'CHECKOUTS':>9} {'TIMEOUTS':>8} {'WAIT P99':>9}"
    )
    lines = [header]
    for s in snapshots:
        limit = "-" if s.max is None else str(s.max)
        p99 = "-" if s.wait_p99 is None else f"{s.wait_p99 * 1000:.1f}ms"
        name = s.name if len(s.name) <= 44 else "…" + s.name[-43:]
        lines.append(
            f"{name:<44} {s.kind:<10} {f'{s.used}/{limit}':>9} {_bar(s.used, s.max):<10} "
            f"{s.idle:>4} {s.pending:>4} {s.checkouts:>9} {s.timeouts:>8} {p99:>9}"
        )
    return "\n".join(lines)


def _worker(engine: Any, scenario: Scenario, stop: threading.Event, failures: list[int]) -> None:
    import sqlalchemy as sa

    rng = random.Random()
    while not stop.is_set():
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT count(*) FROM orders")).scalar()
                stop.wait(rng.uniform(*scenario.hold))
        except sa.exc.TimeoutError:
            failures.append(1)
        stop.wait(rng.uniform(*scenario.pause))


def demo(args: argparse.Namespace, out: TextIO) -> int:
    """Run the embedded demo until ``--duration`` passes or Ctrl-C."""
    try:
        import sqlalchemy as sa
    except ImportError:
        print("poolwatch demo: needs SQLAlchemy: pip install 'poolwatch[sqlalchemy]'", file=out)
        return 1
    scenario = SCENARIOS[args.scenario]
    try:
        handle = poolwatch.instrument(prometheus_port=args.port)
    except poolwatch.ConfigError as error:
        print(f"poolwatch demo: {error}", file=out)
        return 1
    stop = threading.Event()
    workers: list[threading.Thread] = []
    try:
        with tempfile.TemporaryDirectory(prefix="poolwatch-demo-") as tmp:
            engine = sa.create_engine(
                args.url or f"sqlite:///{Path(tmp) / 'orders.db'}",
                pool_size=scenario.pool_size,
                max_overflow=scenario.max_overflow,
                pool_timeout=scenario.pool_timeout,
            )
            poolwatch.track(engine, name="orders-db")
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY)"))
            if handle.prometheus_address:
                host, port = handle.prometheus_address
                print(f"Prometheus metrics on http://{host}:{port}/metrics", file=out)
            print(f"scenario {args.scenario}: {scenario.description}", file=out)
            failures: list[int] = []
            for i in range(args.workers):
                worker = threading.Thread(
                    target=_worker, args=(engine, scenario, stop, failures), name=f"demo-{i}"
                )
                worker.start()
                workers.append(worker)
            deadline = time.monotonic() + args.duration
            try:
                while time.monotonic() < deadline:
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                    print("\n" + render(poolwatch.pools()), file=out, flush=True)
            except KeyboardInterrupt:
                print("\nstopping…", file=out)
            stop.set()
            for worker in workers:
                worker.join(5)
            engine.dispose()
    finally:
        stop.set()
        poolwatch.uninstrument()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolwatch", description="Connection-pool observability for Python services."
    )
    parser.add_argument("--version", action="version", version=f"poolwatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_demo = commands.add_parser(
        "demo",
        help="run an instrumented workload on an embedded SQLite database",
        description="Run a SQLAlchemy workload on a throw-away SQLite database, instrumented "
        "by poolwatch; print the pool table every second and serve Prometheus metrics.",
    )
    run_demo.add_argument("--scenario", choices=sorted(SCENARIOS), default="healthy")
    run_demo.add_argument("--duration", type=_positive, default=30.0, help="seconds (default 30)")
    run_demo.add_argument("--workers", type=int, default=8, help="worker threads (default 8)")
    run_demo.add_argument(
        "--port", type=int, default=9464, help="Prometheus port on 127.0.0.1 (default 9464)"
    )
    run_demo.add_argument(
        "--url",
        help="a SQLAlchemy database URL to run against instead of a throw-away SQLite file",
    )
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``poolwatch`` command."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return demo(args, sys.stdout)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
