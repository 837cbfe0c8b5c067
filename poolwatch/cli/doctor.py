"""``poolwatch doctor``: watch a running process's pools for a while and say what to fix.

It reads the process's poolwatch metrics in the Prometheus format twice, ``--interval``
seconds apart, and reports every finding of ``_advice`` — exhaustion, saturation, size,
discards, churn, stale connections, leaks, unbounded pools — with the numbers behind it
and concrete advice; the anti-patterns poolwatch found inside the process
(``poolwatch.antipatterns``) that those findings do not already say; and, when the process
exports its process view, file descriptors near their limit and untracked connections
piling up in ``close_wait``. Exit code 0: nothing to report; 3: findings were reported.

Only a pool seen at both readings is judged. One that appeared in between (created during
the interval, or first exported then) has no first reading to compare with: taking zeros
for it would charge its whole life to the interval — a pool warming up, opening a
connection for each of its first checkouts, would look like it churns. One whose counters
went backwards (the process restarted) has no valid interval either. Both are named, so
that a second run can judge them.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from poolwatch.cli import top as _top
from poolwatch.diagnostics import advice as _advice
from poolwatch.diagnostics import antipatterns as _antipatterns
from poolwatch.diagnostics.advice import Counts, ProcessCounts

EXIT_FINDINGS = 3
"""Exit code when the doctor reports findings."""

_ORDER = {"critical": 0, "warning": 1}
FD_HIGH = 0.8
"""Open file descriptors per limit from which the process is told it is near it."""
CLOSE_WAIT_UNTRACKED = 5
"""Untracked connections in close_wait, at both readings, from which it is a finding."""
PROCESS = "the process"
_SAID_BY = {  # anti-patterns the doctor's own findings already report, by their topic
    "unbounded_pool": ("unbounded",),
    "pool_overflowing": ("overflowing", "discarding"),
    "keepalive_too_long": ("stale",),
}
_COUNTERS = ("checkouts", "timeouts", "discards", "stale", "connects", "hold_total", "holds")


def _restarted(now: Counts, before: Counts) -> bool:
    return any(getattr(now, name) < getattr(before, name) for name in _COUNTERS)


def report(
    now: dict[tuple[str, str], Counts],
    before: dict[tuple[str, str], Counts],
    seconds: float,
) -> tuple[list[_advice.Finding], list[str]]:
    """Findings of the pools seen at both readings, worst first; and the pools not judged
    (``name (kind): why``)."""
    found: list[_advice.Finding] = []
    unjudged: list[str] = []
    for key, pool in sorted(now.items()):
        kind, name = key
        previous = before.get(key)
        if previous is None:
            unjudged.append(f"{name} ({kind}): appeared during the observation, not judged")
        elif _restarted(pool, previous):
            unjudged.append(f"{name} ({kind}): its counters went back (a restart?), not judged")
        else:
            found += _advice.findings(pool, previous, seconds)
    for (kind, name), pool in sorted(now.items()):
        said = {f.topic for f in found if (f.kind, f.pool) == (kind, name)}
        for antipattern in sorted(pool.antipatterns):
            if not said & set(_SAID_BY.get(antipattern, ())):
                found.append(
                    _advice.Finding(
                        "warning",
                        kind,
                        name,
                        antipattern,
                        "found by poolwatch in the process (its WARNING log line has the numbers)",
                        _antipatterns.advice_for(antipattern, kind),
                    )
                )
    found.sort(key=lambda f: (_ORDER[f.severity], f.pool, f.kind))
    return found, unjudged


def process_findings(
    now: ProcessCounts | None, before: ProcessCounts | None
) -> list[_advice.Finding]:
    """The process view's findings; levels must hold at both readings."""
    if now is None or before is None:
        return []
    found = []
    used, limit = now.file_descriptors, now.file_descriptors_max
    if used is not None and before.file_descriptors is not None and limit:
        share = min(used, before.file_descriptors) / limit
        if share >= FD_HIGH:
            found.append(
                _advice.Finding(
                    "warning",
                    "process view",
                    PROCESS,
                    "file descriptors",
                    f"{used:.0f} of {limit:.0f} open ({share:.0%}): at the limit, new "
                    "connections fail with 'Too many open files'",
                    "raise the limit (ulimit -n, systemd LimitNOFILE=, the container's nofile "
                    "ulimit) and find who holds them: poolwatch.process_view() in the "
                    "process, ls -l /proc/PID/fd",
                )
            )
    key = ("close_wait", "untracked")
    waiting = min(now.connections.get(key, 0.0), before.connections.get(key, 0.0))
    if waiting >= CLOSE_WAIT_UNTRACKED:
        found.append(
            _advice.Finding(
                "warning",
                "process view",
                PROCESS,
                "close_wait",
                f"{waiting:.0f} TCP connections no tracked pool owns: their servers closed "
                "them and nothing in this process has",
                "a client poolwatch does not hook leaks its connections: find it by "
                'server_address in poolwatch_process_connections{owner="untracked"} and close '
                'its responses; pools poolwatch hooks are counted under owner="pool"',
            )
        )
    return found


def run(url: str, *, interval: float, out: TextIO, progress: TextIO | None = None) -> int:
    """Observe ``url`` for ``interval`` seconds and print the findings (progress: stderr)."""
    progress = progress if progress is not None else sys.stderr
    (before, process_before), started = _top.read_all(url), time.monotonic()
    _top.countdown(interval, f"poolwatch doctor: observing {url}", progress)
    (now, process_now), seconds = _top.read_all(url), time.monotonic() - started
    found, unjudged = report(now, before, seconds)
    found += process_findings(process_now, process_before)
    print(f"{len(now)} pools observed for {seconds:.1f} s at {url}", file=out)
    for line in unjudged:
        print(f"{'NOTE':<8}  {line}: run the doctor again to judge it", file=out)
    if not found:
        print("no problems found", file=out)
        return 0
    for finding in found:
        print(
            f"{finding.severity.upper():<8}  {finding.pool} ({finding.kind}): {finding.problem}",
            file=out,
        )
        print(f"{'':<8}  advice: {finding.advice}", file=out)
    return EXIT_FINDINGS


def configured(modules: list[str], out: TextIO) -> int:
    """Import ``modules`` (an application's own, which create its engines and clients)
    under poolwatch, then report what their configuration alone shows: the configuration
    anti-patterns (no limit, no pool timeout) and each pool's limits. Nothing is measured:
    for demand, waits and churn, run the doctor against the running process."""
    import importlib

    from opentelemetry.sdk.metrics import MeterProvider

    import poolwatch

    if "" not in sys.path:
        sys.path.insert(0, "")  # the application's modules, as `python -m` would find them
    # The report below says what poolwatch's own WARNING lines would: not twice.
    logging.getLogger("poolwatch").setLevel(logging.ERROR)
    handle = poolwatch.instrument(meter_provider=MeterProvider(), process_view="off")
    try:
        for module in modules:
            importlib.import_module(module)
        snapshots = handle.pools()
    finally:
        handle.uninstrument()
    print(f"{len(snapshots)} pools configured by {', '.join(modules)}", file=out)
    found = 0
    for pool in snapshots:
        limit = "no limit" if pool.max is None else f"max {pool.max}"
        idle = "" if pool.idle_max is None else f", keeps up to {pool.idle_max} idle"
        print(f"{'POOL':<8}  {pool.name} ({pool.kind}): {limit}{idle}", file=out)
        for antipattern in pool.antipatterns:
            found += 1
            print(f"{'WARNING':<8}  {pool.name} ({pool.kind}): {antipattern.problem}", file=out)
            print(f"{'':<8}  advice: {antipattern.advice}", file=out)
    if not found:
        print("no problems found in the configuration", file=out)
        return 0
    return EXIT_FINDINGS
