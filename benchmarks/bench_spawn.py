"""Cost of a ``subprocess`` spawn with a ``preexec_fn``, bare and with poolwatch.

A ``preexec_fn`` makes ``subprocess`` fork in Python and run the fork handlers in the child
before ``exec``; poolwatch's handler used to start its thread and, with a provider of its
own, build a whole new one there (docs/architecture.md, Fork). This measures what a spawn
costs the parent, fork to the child's exit, in four processes that differ only in that:

* ``bare`` — the same program without poolwatch;
* ``imported`` — the same, having imported what an instrumented process has (poolwatch, the
  SDK, the OTLP exporter) without instrumenting: a larger process is slower to fork, and
  this is the part of the difference that is not poolwatch's handler;
* ``instrumented`` — ``poolwatch.instrument()`` with a provider of its own exporting over
  OTLP (to a closed loopback port, every 60 s: nothing is sent while measuring);
* ``eager`` — the same, with the child's set-up done at the fork as before (the handler
  told that no ``exec`` follows): what deferring it saves;
* ``poolwatch run`` — the bare program started by ``poolwatch run`` with the same
  environment (instrumented through ``sitecustomize``).

Each process creates five SQLite pools, then times ``SPAWNS`` spawns of ``/bin/true``
(after a few unmeasured ones) and reports two figures: the median wall-clock time of a
spawn, and the CPU time a spawn costs — the parent's (the fork itself: copying its page
tables) and the child's (fork handlers, ``preexec_fn``, ``exec`` and ``/bin/true``), from
``getrusage``, averaged over the spawns. On a shared machine the CPU figure is the one
to read: another process's load lengthens the wall clock, not the CPU time. One round
runs the processes once each, in an order rotated every round; ratios to ``bare`` are
taken within a round, and their median over the rounds is printed with its interquartile
range.

Usage (the poolwatch measured is the one ``PYTHONPATH`` or the environment gives)::

    PYTHONPATH=$PWD python benchmarks/bench_spawn.py [--rounds 9] [--spawns 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, summarize

PROGRAM = textwrap.dedent(
    """
    import json, os, resource, statistics, subprocess, sys, tempfile, time
    import sqlalchemy as sa

    mode, spawns = sys.argv[1], int(sys.argv[2])
    if mode == "imported":
        import poolwatch, poolwatch._api, poolwatch._provider
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    if mode in ("instrumented", "eager"):
        import poolwatch
        from poolwatch import _api

        if mode == "eager":
            _api._forked_to_exec = lambda frame: False
        poolwatch.instrument(process_view="off")
    folder = tempfile.mkdtemp()
    engines = [sa.create_engine(f"sqlite:///{folder}/{i}.db") for i in range(5)]
    for engine in engines:
        engine.connect().close()
    true = sys.argv[3]

    def noop():
        pass

    def cpu():
        mine = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime

    for _ in range(5):
        subprocess.run([true], preexec_fn=noop, check=True)
    times = []
    cpu_start = cpu()
    for _ in range(spawns):
        start = time.perf_counter()
        subprocess.run([true], preexec_fn=noop, check=True)
        times.append(time.perf_counter() - start)
    cpu_each = (cpu() - cpu_start) / spawns
    print(json.dumps([statistics.median(times), cpu_each]))
    """
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CPU: dict[str, list[float]] = {}
"""CPU time a spawn, by variant, in the order of the wall-clock samples."""


def _variant(name: str, command: list[str], env: dict[str, str]) -> Callable[[], float]:
    def run() -> float:
        result = subprocess.run(  # run elsewhere: ``-c`` puts the working directory first
            command,  # on sys.path, before PYTHONPATH (which picks the poolwatch measured)
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
            cwd=tempfile.gettempdir(),
        )
        if result.returncode != 0:
            raise SystemExit(f"{command[:3]} failed: {result.stderr.strip()[-400:]}")
        wall, cpu = json.loads(result.stdout.strip().splitlines()[-1])
        CPU.setdefault(name, []).append(float(cpu))
        return float(wall)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--spawns", type=int, default=60)
    args = parser.parse_args()
    true = shutil.which("true")
    poolwatch_command = shutil.which("poolwatch", path=os.path.dirname(sys.executable))
    if true is None or poolwatch_command is None:
        raise SystemExit("needs /bin/true and the poolwatch command next to this Python")
    env = {
        **os.environ,
        "OTEL_METRICS_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "OTEL_METRIC_EXPORT_INTERVAL": "60000",
        "POOLWATCH_PROCESS_VIEW": "off",
    }
    python = [sys.executable, "-c", PROGRAM]
    spawns = str(args.spawns)
    variants = {
        name: _variant(name, [*python, name, spawns, true], env)
        for name in ("bare", "imported", "instrumented", "eager")
    }
    variants["poolwatch run"] = _variant(
        "poolwatch run", [poolwatch_command, "run", "--", *python, "bare", spawns, true], env
    )
    started = time.monotonic()
    samples = interleave(variants, args.rounds)
    print(
        f"spawn with preexec_fn, median of {args.spawns} spawns a process, {args.rounds} rounds "
        f"({time.monotonic() - started:.0f} s)"
    )
    for title, table in (("CPU time", CPU), ("wall clock", samples)):
        header = f"{'variant':<15} {'ms a spawn':>10} {'IQR':>13} {'x bare':>7} {'IQR':>11}"
        print(f"\n{title}: {header}")
        for name, values in table.items():
            ms = summarize([v * 1000 for v in values])
            ratio = summarize([v / b for v, b in zip(values, table["bare"], strict=True)])
            print(
                f"{'':<{len(title) + 2}}{name:<15} {ms.median:>10.2f} {ms.spread():>13} "
                f"{ratio.median:>7.2f} {ratio.spread():>11}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
