"""``poolwatch doctor``: watch a running process's pools for a while and say what to fix.

It reads the process's poolwatch metrics in the Prometheus format twice, ``--interval``
seconds apart, and reports every finding of ``_advice`` — exhaustion, saturation, size,
discards, churn, stale connections, leaks, unbounded pools — with the numbers behind it
and concrete advice. Exit code 0: nothing to report; 3: findings were reported.

Only a pool seen at both readings is judged. One that appeared in between (created during
the interval, or first exported then) has no first reading to compare with: taking zeros
for it would charge its whole life to the interval — a pool warming up, opening a
connection for each of its first checkouts, would look like it churns. One whose counters
went backwards (the process restarted) has no valid interval either. Both are named, so
that a second run can judge them.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from poolwatch import _advice, _top
from poolwatch._advice import Counts

EXIT_FINDINGS = 3
"""Exit code when the doctor reports findings."""

_ORDER = {"critical": 0, "warning": 1}
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
    found.sort(key=lambda f: (_ORDER[f.severity], f.pool, f.kind))
    return found, unjudged


def run(url: str, *, interval: float, out: TextIO, progress: TextIO | None = None) -> int:
    """Observe ``url`` for ``interval`` seconds and print the findings (progress: stderr)."""
    progress = progress if progress is not None else sys.stderr
    before, started = _top.read(url), time.monotonic()
    _top.countdown(interval, f"poolwatch doctor: observing {url}", progress)
    now, seconds = _top.read(url), time.monotonic() - started
    found, unjudged = report(now, before, seconds)
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
