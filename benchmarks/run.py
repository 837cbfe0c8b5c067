"""poolwatch benchmarks: one command, side-by-side results measured in one run.

Usage (from anywhere; paths are resolved from this file)::

    python benchmarks/run.py            # all but instructions, 30-35 minutes on 2 cores
    python benchmarks/run.py --quick    # smaller sizes and fewer rounds (a smoke test)
    python benchmarks/run.py --only hotpath,collect
    python benchmarks/run.py --only instructions   # valgrind, 25-40 minutes
    python benchmarks/run.py --no-venv  # use the current interpreter as it is

Unless ``--no-venv`` is given, the script creates ``benchmarks/.venv`` (gitignored) with the
pinned versions of ``benchmarks/requirements.txt`` — poolwatch editable from this
repository, SQLAlchemy 2.0.x and ``opentelemetry-instrumentation-sqlalchemy``, which refuses
SQLAlchemy 2.1 — reinstalls it only when that file or ``pyproject.toml`` changes, and
re-executes itself inside it. With ``--no-venv`` and no accepted contrib package, the
contrib variant is skipped and the reason printed.

Sections (see each module's docstring for the method):

* ``hotpath`` (bench_sqlalchemy.py) — one QueuePool checkout+checkin: bare, poolwatch,
  contrib; plus the cost poolwatch defers to collection (``Ledger.drain``/``snapshot``);
* ``collect`` (bench_collect.py) — ``get_metrics_data()`` with 1 to 10,000 live pools;
* ``memory`` (bench_memory.py) — bytes per tracked pool;
* ``http`` (bench_http.py) — added cost per loopback keep-alive request for urllib3,
  requests, httpx (sync and async), aiohttp and boto3 against moto: bare, poolwatch, and
  each library's OpenTelemetry contrib instrumentation; acquire+release of urllib3,
  httpx (httpcore) and aiohttp pools;
* ``redis`` (bench_redis.py) — acquire+release of redis-py's pools (sync, blocking,
  asyncio) and a loopback ``PING``, bare and poolwatch, against a throw-away redis-server
  (skipped, and said so, when none can run);
* ``postgres`` (bench_postgres.py) — acquire+release of psycopg_pool (sync and async) and
  asyncpg pools on a throw-away PostgreSQL, bare and with poolwatch, against a loopback
  ``SELECT 1``; and psycopg_pool's in situ (skipped when the server binaries are missing);
* ``traces`` (bench_traces.py) — a free checkout with poolwatch's wait spans on and off,
  against a span per checkout; the cost of one wait that is recorded as spans;
* ``instructions`` (bench_instructions.py, only with ``--only``) — instructions poolwatch
  adds per checkout+checkin and per request, counted by valgrind: a figure the machine's
  noise cannot move.

docs/performance.md records a run and reads it against the targets.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV = HERE / ".venv"
REQUIREMENTS = HERE / "requirements.txt"
STAMP = VENV / ".requirements-installed"
SECTIONS = (
    "hotpath",
    "collect",
    "memory",
    "http",
    "redis",
    "postgres",
    "traces",
    "instructions",
)
DEFAULT_SECTIONS = ("hotpath", "collect", "memory", "http", "redis", "postgres", "traces")
"""What a plain run measures; ``instructions`` (valgrind, minutes) only with ``--only``."""
CORE_PACKAGES = ("SQLAlchemy", "opentelemetry-sdk", "opentelemetry-instrumentation-sqlalchemy")
HTTP_PACKAGES = (
    "urllib3",
    "requests",
    "httpx",
    "httpcore",
    "aiohttp",
    "boto3",
    "botocore",
    "moto",
    "redis",
)
"""The libraries the http and redis sections measure, printed with their versions."""
POSTGRES_PACKAGES = ("psycopg", "psycopg-binary", "psycopg-pool", "asyncpg")
"""The libraries the postgres section measures, printed with their versions."""
HTTP_CONTRIB_PACKAGES = (
    "opentelemetry-instrumentation-urllib3",
    "opentelemetry-instrumentation-requests",
    "opentelemetry-instrumentation-httpx",
    "opentelemetry-instrumentation-aiohttp-client",
    "opentelemetry-instrumentation-botocore",
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="poolwatch benchmarks")
    parser.add_argument("--no-venv", action="store_true", help="run in this interpreter")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated subset of {SECTIONS} (default: all but instructions)",
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown or not chosen:
        parser.error(f"--only got {args.only!r}: expected a comma-separated subset of {SECTIONS}")
    args.sections = chosen
    return args


# -- the pinned environment --------------------------------------------------------------


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def in_bench_venv() -> bool:
    """True when this interpreter is the one of benchmarks/.venv."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def _wanted_stamp() -> str:
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, REPO / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_venv() -> Path:
    """Create or refresh benchmarks/.venv; return its interpreter."""
    python = _venv_python()
    if not python.exists():
        print(f"==> creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    wanted = _wanted_stamp()
    if not STAMP.exists() or STAMP.read_text().strip() != wanted:
        print(f"==> installing {REQUIREMENTS.name} into {VENV}", flush=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True, cwd=REPO)
        STAMP.write_text(wanted + "\n")
    return python


# -- reporting ---------------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> str:
    """Where and with what the figures were measured."""
    import poolwatch

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    packages = f"poolwatch {poolwatch.__version__} ({Path(poolwatch.__file__).parent}), "
    packages += ", ".join(f"{name} {_version(name)}" for name in CORE_PACKAGES)
    http = ", ".join(f"{name} {_version(name)}" for name in HTTP_PACKAGES)
    postgres = ", ".join(f"{name} {_version(name)}" for name in POSTGRES_PACKAGES)
    contrib = ", ".join(f"{name} {_version(name)}" for name in HTTP_CONTRIB_PACKAGES)
    return "\n".join(
        [
            f"machine: {os.cpu_count()} CPUs (nproc), {_cpu_model()}; load average {load}",
            f"python:  {platform.python_implementation()} {platform.python_version()} "
            f"({sys.executable})",
            f"packages: {packages}",
            f"http:     {http}",
            f"postgres: {postgres}",
            f"contrib:  {contrib}",
            f"commit:  {_commit()}",
        ]
    )


# -- sections ------------------------------------------------------------------------------


def run_sections(sections: Sequence[str], quick: bool) -> None:
    """Run and print each chosen section as soon as it is done."""
    import bench_collect
    import bench_http
    import bench_instructions
    import bench_memory
    import bench_postgres
    import bench_redis
    import bench_sqlalchemy
    import bench_traces

    if "hotpath" in sections:
        config = (
            bench_sqlalchemy.HotPathConfig(rounds=7, ops=1000, warmup=100, drain_rounds=3)
            if quick
            else bench_sqlalchemy.HotPathConfig()
        )
        hot = bench_sqlalchemy.run_hot_path(config)
        print(bench_sqlalchemy.render_hot_path(hot, config), flush=True)
        drain = bench_sqlalchemy.run_drain(config)
        print(bench_sqlalchemy.render_drain(drain, hot, config), flush=True)
    if "collect" in sections:
        cases = bench_collect.QUICK_CASES if quick else bench_collect.FULL_CASES
        collected = bench_collect.run_collection(cases)
        print(bench_collect.render_collection(collected), flush=True)
    if "memory" in sections:
        memory_config = (
            bench_memory.MemoryConfig(engines=200, rounds=1)
            if quick
            else bench_memory.MemoryConfig()
        )
        print(bench_memory.render_memory(bench_memory.run_memory(memory_config)), flush=True)
    if "http" in sections:
        http_config = (
            bench_http.HTTPConfig(
                rounds=5,
                requests=100,
                warmup=10,
                acquire_ops=5_000,
                acquire_rounds=5,
                in_situ_layouts=2,
                in_situ_pairs=25,
                in_situ_seconds=3.0,
            )
            if quick
            else bench_http.HTTPConfig()
        )
        measured = bench_http.run_http(http_config)
        print(bench_http.render_http(measured, http_config), flush=True)
    if "redis" in sections:
        redis_config = (
            bench_http.HTTPConfig(
                rounds=5,
                requests=100,
                warmup=10,
                acquire_ops=5_000,
                acquire_rounds=5,
                in_situ_layouts=2,
                in_situ_pairs=25,
                in_situ_seconds=3.0,
            )
            if quick
            else bench_http.HTTPConfig()
        )
        print(bench_redis.main(redis_config), flush=True)
    if "postgres" in sections:
        from poolwatch._demo.postgres import PostgresError, find_bin_dir

        try:
            find_bin_dir()
        except PostgresError as missing:
            print(f"\npostgres section skipped: {missing}", flush=True)
        else:
            pg_config = (
                bench_postgres.PostgresConfig(
                    rounds=5, ops=1_000, warmup=50, round_trips=200, in_situ_pairs=20
                )
                if quick
                else bench_postgres.PostgresConfig()
            )
            measured_pg = bench_postgres.run_postgres(pg_config)
            print(bench_postgres.render_postgres(measured_pg, pg_config), flush=True)
    if "traces" in sections:
        bench_traces.main(quick)
    if "instructions" in sections:
        counting = (
            bench_instructions.InstructionConfig(
                small=50, large=150, repeats=1, sqlalchemy_small=500, sqlalchemy_large=1500
            )
            if quick
            else bench_instructions.InstructionConfig()
        )
        counted = bench_instructions.run_instructions(counting)
        print(bench_instructions.render_instructions(counted, counting), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if not args.no_venv and not in_bench_venv():
        python = ensure_venv()
        os.execv(str(python), [str(python), str(Path(__file__).resolve()), *raw])
    sys.path[:0] = [str(HERE), str(REPO)]
    started = time.perf_counter()
    print("poolwatch benchmarks" + (" (--quick: sizes reduced)" if args.quick else ""))
    print(environment(), flush=True)
    run_sections(args.sections, args.quick)
    elapsed = time.perf_counter() - started
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nfinished in {elapsed:.0f} s; load average now {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
