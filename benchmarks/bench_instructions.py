"""Instructions poolwatch adds per operation, counted by valgrind: a figure noise cannot move.

Wall-clock medians on a shared two-core machine move by ±10% and more between rounds
(the ``http`` section's request rows) — ten times the 1% budget they are read against.
The processor's instruction count of the same work does not: ``valgrind --tool=callgrind``
counts every instruction a thread executes, whatever else the machine does. Only the
main thread, which makes the requests, is counted: poolwatch's own thread works once a
second, and at callgrind's slowdown its wake-ups would be charged some fifty times over
to each request (``_count``). This
section runs each operation in a child process under callgrind, ``bare`` and with
``poolwatch``, twice — ``small`` and ``large`` operations — so that start-up, imports and
warm-up cancel out::

    instructions per operation = (I(large) - I(small)) / (large - small)

and reports what poolwatch adds, in instructions and as a share of the bare operation.
Instructions are not time — a cache miss costs more than an add — but poolwatch's hooks
run on data the library itself has just touched, and a hook that does twice the work
shows as twice the instructions. The garbage collector runs inside the counted window at
slightly different moments between the two lengths: a few thousand instructions of
spread on a loopback request, which the table shows as the spread over ``repeats``.

Operations: a SQLAlchemy ``QueuePool`` checkout+checkin (SQLite file), one loopback
keep-alive request with urllib3, requests, httpx (sync and async) and aiohttp, against
``poolwatch upstream`` in its own process, and a boto3 DynamoDB ``ListTables`` against
moto's server in its own process (the servers' instructions are not counted). The child
is this module run as a script (``python bench_instructions.py CASE VARIANT N URL``).

Needs valgrind (Debian package ``valgrind``); without it the section says so and is
skipped. It takes 25 to 40 minutes: callgrind runs Python some fifty times slower, and
each measurement is taken three times (the median is reported, the range shown). The
three agree closely; runs hours apart, or beside other work, differ by a few thousand
instructions on a network request, whose reads and polls follow the server's timing.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CASES = ("sqlalchemy", "urllib3", "requests", "httpx", "httpx-async", "aiohttp", "boto3")
TARGET_PCT = 1.0
"""The request-level budget: poolwatch adds at most 1% to a request."""


@dataclass(frozen=True)
class InstructionConfig:
    """Sizes of one run."""

    small: int = 100
    large: int = 400
    repeats: int = 3
    """Measurements of each variant (their median is reported, their range shown)."""
    sqlalchemy_small: int = 1_000
    sqlalchemy_large: int = 4_000


@dataclass(frozen=True)
class CaseResult:
    """Instructions per operation of one case, by variant: the median and the range."""

    case: str
    per_op: dict[str, tuple[float, float, float]]

    def added(self) -> float:
        return self.per_op["poolwatch"][0] - self.per_op["bare"][0]


_TOTALS = re.compile(r"^totals: (\d+)$", re.MULTILINE)


def _count(case: str, variant: str, n: int, url: str) -> int:
    """Instructions of one child run's main thread, counted by callgrind.

    Only the thread that makes the requests counts: poolwatch's own thread wakes once a
    second (its work is per second, not per request), and callgrind runs the child some
    fifty times slower, so its wake-ups would be charged fifty times over to each
    request — and more when the machine is busy and the run takes longer.
    """
    valgrind = shutil.which("valgrind")
    assert valgrind is not None
    with tempfile.TemporaryDirectory(prefix="poolwatch-callgrind-") as out:
        command = [
            valgrind,
            "--tool=callgrind",
            "--separate-threads=yes",  # one file a thread: cg-01 is the main thread
            f"--callgrind-out-file={out}/cg",
            sys.executable,
            str(Path(__file__).resolve()),
            case,
            variant,
            str(n),
            url,
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts in every run
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=1800, check=False, env=env
        )
        if result.returncode != 0:
            raise RuntimeError(f"{case} {variant}: callgrind run failed:\n{result.stderr[-2000:]}")
        main = Path(out, "cg-01")
        found = _TOTALS.search(main.read_text()) if main.exists() else None
        if found is None:
            raise RuntimeError(f"{case} {variant}: no main-thread totals in {main}")
        return int(found.group(1))


def run_instructions(config: InstructionConfig) -> list[CaseResult] | str:
    """Every case against a loopback upstream of its own, or why the section cannot run."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian: apt-get install valgrind): section skipped"
    from bench_http import _free_port, _server

    port, moto_port = _free_port(), _free_port()
    upstream = [sys.executable, "-m", "poolwatch", "upstream", "--port", str(port)]
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if moto is None:
        raise RuntimeError("moto_server not found: the benchmark environment installs moto")
    with (
        _server(upstream, port),
        _server([moto, "-H", "127.0.0.1", "-p", str(moto_port)], moto_port),
    ):
        return _measure(config, f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{moto_port}")


def _measure(config: InstructionConfig, url: str, moto_url: str) -> list[CaseResult]:
    results = []
    for case in CASES:
        target = moto_url if case == "boto3" else url
        small, large = (
            (config.sqlalchemy_small, config.sqlalchemy_large)
            if case == "sqlalchemy"
            else (config.small, config.large)
        )
        per_op: dict[str, tuple[float, float, float]] = {}
        for variant in ("bare", "poolwatch"):
            samples = [
                (_count(case, variant, large, target) - _count(case, variant, small, target))
                / (large - small)
                for _ in range(config.repeats)
            ]
            per_op[variant] = (statistics.median(samples), min(samples), max(samples))
        results.append(CaseResult(case, per_op))
    return results


def render_instructions(results: list[CaseResult] | str, config: InstructionConfig) -> str:
    """The table and the verdicts."""
    from _common import heading, table, verdict

    lines = [heading("Instructions per operation (valgrind callgrind): bare vs poolwatch")]
    if isinstance(results, str):
        return "\n".join([*lines, results, ""])
    lines.append(
        f"per operation = (I({config.large}) - I({config.small})) / {config.large - config.small}"
        f" (SQLAlchemy: {config.sqlalchemy_small} and {config.sqlalchemy_large} ops); median of "
        f"{config.repeats} measurements, range in brackets"
    )
    rows = []
    for r in results:
        bare, pw = r.per_op["bare"], r.per_op["poolwatch"]
        added = r.added()
        rows.append(
            [
                r.case,
                f"{bare[0]:,.0f} [{bare[1]:,.0f}-{bare[2]:,.0f}]",
                f"{pw[0]:,.0f} [{pw[1]:,.0f}-{pw[2]:,.0f}]",
                f"{added:+,.0f} ({added / bare[0] * 100:+.2f}%)",
            ]
        )
    lines.append(table(["operation", "bare", "poolwatch", "added"], rows))
    lines.append("")
    for r in results:
        if r.case == "sqlalchemy":
            continue  # its budget is in microseconds: the hotpath section
        pct = r.added() / r.per_op["bare"][0] * 100
        lines.append(
            f"{r.case}: poolwatch adds {pct:+.2f}% of a request's instructions "
            f"(target <= {TARGET_PCT:.0f}%): {verdict(pct <= TARGET_PCT)}"
        )
    return "\n".join([*lines, ""])


# -- the child: one case, one variant, n operations ------------------------------------------


def _sqlalchemy(n: int, _url: str) -> None:
    import sqlalchemy as sa

    with tempfile.TemporaryDirectory() as tmp:
        engine = sa.create_engine(f"sqlite:///{tmp}/bench.db", pool_size=5)
        pool = engine.pool
        for _ in range(n):
            pool.connect().close()
        engine.dispose()


def _urllib3(n: int, url: str) -> None:
    import urllib3

    manager = urllib3.PoolManager()
    for _ in range(n):
        manager.request("GET", url)


def _requests(n: int, url: str) -> None:
    import requests

    with requests.Session() as session:
        for _ in range(n):
            session.get(url)


def _httpx(n: int, url: str) -> None:
    import httpx

    with httpx.Client() as client:
        for _ in range(n):
            client.get(url)


def _httpx_async(n: int, url: str) -> None:
    import asyncio

    import httpx

    async def main() -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(n):
                await client.get(url)

    asyncio.run(main())


def _aiohttp(n: int, url: str) -> None:
    import asyncio

    import aiohttp

    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(n):
                async with session.get(url) as response:
                    await response.read()

    asyncio.run(main())


def _boto3(n: int, url: str) -> None:
    import boto3

    client = boto3.client(
        "dynamodb",
        endpoint_url=url,
        region_name="eu-west-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    for _ in range(n):
        client.list_tables()
    client.close()


_RUN: dict[str, Callable[[int, str], None]] = {
    "sqlalchemy": _sqlalchemy,
    "urllib3": _urllib3,
    "requests": _requests,
    "httpx": _httpx,
    "httpx-async": _httpx_async,
    "aiohttp": _aiohttp,
    "boto3": _boto3,
}


def _child(case: str, variant: str, n: int, url: str) -> None:
    # Both variants import poolwatch and the SDK and make a provider: the same modules and
    # heap (the garbage collector's work grows with the heap), so that only the hooks differ.
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    import poolwatch

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    if variant == "poolwatch":
        # the process view's reading every 10 s, on poolwatch's thread, is not per operation
        poolwatch.instrument(meter_provider=provider, process_view="off")
    _RUN[case](n, url)
    counted = sum(s.checkouts for s in poolwatch.pools())
    if counted != (n if variant == "poolwatch" else 0):
        raise SystemExit(f"{case} {variant}: poolwatch counted {counted} checkouts for {n}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
