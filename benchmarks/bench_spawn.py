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
(after a few unmeasured ones) and reports their median. One round runs the four processes
once each, in an order rotated every round; ratios are taken within a round and their
median over the rounds is printed with its interquartile range.

Usage::

    python benchmarks/bench_spawn.py [--rounds 9] [--spawns 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleave, summarize

PROGRAM = textwrap.dedent(
    """
    import json, os, statistics, subprocess, sys, tempfile, time
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

    times = []
    for i in range(spawns + 5):
        start = time.perf_counter()
        subprocess.run([true], preexec_fn=noop, check=True)
        if i >= 5:
            times.append(time.perf_counter() - start)
    print(json.dumps(statistics.median(times)))
    """
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _variant(command: list[str], env: dict[str, str]) -> Callable[[], float]:
    def run() -> float:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=300, check=False
        )
        if result.returncode != 0:
            raise SystemExit(f"{command[:3]} failed: {result.stderr.strip()[-400:]}")
        return float(json.loads(result.stdout.strip().splitlines()[-1]))

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
        "bare": _variant([*python, "bare", spawns, true], env),
        "imported": _variant([*python, "imported", spawns, true], env),
        "instrumented": _variant([*python, "instrumented", spawns, true], env),
        "eager": _variant([*python, "eager", spawns, true], env),
        "poolwatch run": _variant(
            [poolwatch_command, "run", "--", *python, "bare", spawns, true], env
        ),
    }
    started = time.monotonic()
    samples = interleave(variants, args.rounds)
    print(
        f"spawn with preexec_fn, median of {args.spawns} spawns a process, {args.rounds} rounds "
        f"({time.monotonic() - started:.0f} s)"
    )
    print(f"{'variant':<15} {'ms a spawn':>10} {'IQR':>13} {'x bare':>7} {'IQR':>11}")
    for name, values in samples.items():
        ms = summarize([v * 1000 for v in values])
        ratio = summarize([v / b for v, b in zip(values, samples["bare"], strict=True)])
        print(
            f"{name:<15} {ms.median:>10.2f} {ms.spread():>13} {ratio.median:>7.2f} "
            f"{ratio.spread():>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
