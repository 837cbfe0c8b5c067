"""``poolwatch doctor``: watch a running process's pools for a while and say what to fix.

It reads the process's poolwatch metrics in the Prometheus format twice, ``--interval``
seconds apart, and reports every finding of ``_advice`` — exhaustion, saturation, size,
discards, churn, stale connections, leaks, unbounded pools — with the numbers behind it
and concrete advice. Exit code 0: nothing to report; 3: findings were reported.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from poolwatch import _advice, _top

EXIT_FINDINGS = 3
"""Exit code when the doctor reports findings."""

_ORDER = {"critical": 0, "warning": 1}


def run(url: str, *, interval: float, out: TextIO, progress: TextIO = sys.stderr) -> int:
    """Observe ``url`` for ``interval`` seconds and print the findings."""
    before, started = _top.parse(_top.fetch(url)), time.monotonic()
    print(f"poolwatch doctor: observing {url} for {interval:g} s …", file=progress, flush=True)
    time.sleep(interval)
    now, seconds = _top.parse(_top.fetch(url)), time.monotonic() - started
    found: list[_advice.Finding] = []
    for key, pool in sorted(now.items()):
        found += _advice.findings(pool, before.get(key) or _advice.Counts(*key), seconds)
    found.sort(key=lambda f: (_ORDER[f.severity], f.pool, f.kind))
    print(f"{len(now)} pools observed for {seconds:.1f} s at {url}", file=out)
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
