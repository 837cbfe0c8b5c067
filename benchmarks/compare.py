"""Two versions of poolwatch side by side in one run: the hot path and collection.

Usage::

    python benchmarks/compare.py --before 6ab84a6            # against that commit
    python benchmarks/compare.py --before main --rounds 15

The *before* tree is checked out into a temporary git worktree; the *after* tree is this
checkout. Each measurement runs in a child process (``_compare_child.py``) with one tree's
``poolwatch`` first on ``PYTHONPATH``, both trees alternating round by round so that the
machine's drift falls on both alike; the table gives each side's median µs per operation
and the ratio of the medians, with the range of the per-round ratios (after / before of
the same round).

Operations, each instrumented (poolwatch with an in-memory reader, as an application runs):

* ``sqlalchemy`` — a ``QueuePool`` checkout and checkin (SQLite in memory);
* ``urllib3`` — ``_get_conn()`` + ``_put_conn()`` with a live keep-alive connection;
* ``httpx`` — httpcore ``handle_request()`` + ``close()`` on a connection that answers at
  once (no I/O: what is left is the pool's own checkout and return);
* ``aiohttp`` — ``connector.connect()`` + ``release()`` with a live connection;
* ``psycopg_pool`` — ``getconn()`` + ``putconn()`` of a ``ConnectionPool`` with its
  connections open, against a throw-away PostgreSQL on 127.0.0.1 this script starts;
* ``redis`` — a redis-py ``ConnectionPool``'s ``get_connection()`` + ``release()`` with a
  live connection, against a throw-away redis-server on 127.0.0.1 this script starts;
* ``collect`` — one ``get_metrics_data()`` with 100 pool series, per series.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD = HERE / "_compare_child.py"
KINDS = ("sqlalchemy", "urllib3", "httpx", "aiohttp", "psycopg_pool", "redis", "collect")
OPS = {
    "sqlalchemy": 20_000,
    "urllib3": 20_000,
    "httpx": 20_000,
    "aiohttp": 20_000,
    "psycopg_pool": 20_000,
    "redis": 20_000,
    "collect": 40,
}


@contextmanager
def _servers(kinds: list[str]) -> Iterator[dict[str, str]]:
    """The servers the chosen operations need, started once for every round: their URLs,
    by the environment variable the child reads them from."""
    found: dict[str, str] = {}
    with ExitStack() as stack:
        if "psycopg_pool" in kinds:
            from poolwatch._demo.postgres import PostgresCluster

            pg = stack.enter_context(PostgresCluster())
            dsn = f"postgresql://{pg.user}:{pg.password}@{pg.host}:{pg.port}/{pg.dbname}"
            found["POOLWATCH_COMPARE_POSTGRES"] = dsn
        if "redis" in kinds:
            from poolwatch._demo.redis import RedisServer

            found["POOLWATCH_COMPARE_REDIS"] = stack.enter_context(RedisServer()).url()
        yield found


def _measure(tree: Path, kind: str, ops: int, servers: dict[str, str]) -> float:
    done = subprocess.run(
        [sys.executable, str(CHILD), kind, str(ops)],
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", **servers},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{kind} in {tree}: {done.stderr.strip()}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git ref of the version to compare with")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds (default 9)")
    parser.add_argument("--only", default=",".join(KINDS), help="comma-separated operations")
    args = parser.parse_args()
    kinds = [k for k in args.only.split(",") if k]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown operation(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    with (
        tempfile.TemporaryDirectory(prefix="poolwatch-before-") as scratch,
        _servers(kinds) as servers,
    ):
        before = Path(scratch) / "tree"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
            check=True,
            capture_output=True,
        )
        try:
            rows = []
            for kind in kinds:
                pairs = []
                for round_ in range(args.rounds):
                    order = (
                        [(before, 0), (REPO, 1)] if round_ % 2 == 0 else [(REPO, 1), (before, 0)]
                    )
                    pair = [0.0, 0.0]
                    for tree, side in order:
                        pair[side] = _measure(tree, kind, OPS[kind], servers)
                    pairs.append(pair)
                    done = f"before {pair[0]:.3f} µs, after {pair[1]:.3f} µs"
                    print(f"  {kind} round {round_ + 1}: {done}", file=sys.stderr)
                rows.append((kind, pairs))
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
                check=False,
                capture_output=True,
            )
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    print(f"before: {args.before}   after: {head} (working tree)   rounds: {args.rounds}")
    columns = f"{'before µs':>10} {'after µs':>10} {'after/before':>13}"
    print(f"{'operation':<12} {columns}  per-round range")
    for kind, pairs in rows:
        b = statistics.median(p[0] for p in pairs)
        a = statistics.median(p[1] for p in pairs)
        ratios = sorted(p[1] / p[0] for p in pairs)
        print(f"{kind:<12} {b:>10.3f} {a:>10.3f} {a / b:>13.3f}  {ratios[0]:.3f}-{ratios[-1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
