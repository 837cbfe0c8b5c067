"""``poolwatch top``: a live terminal view of every pool of a running process.

It reads any endpoint serving poolwatch's metrics in the Prometheus text format (a process
instrumented with ``prometheus_port``, or a Collector's Prometheus exporter) — no access
to the process itself is needed. Every ``--interval`` it scrapes again; rates (timeouts/s,
discards/s) and the wait p99 are computed over the interval between two scrapes, as
Prometheus would with ``rate()`` and ``histogram_quantile()``.

Keys (on a terminal): ``u`` utilization, ``w`` wait p99, ``t`` timeouts/s, ``d``
discards/s, ``n`` name — sort; ``r`` reverses; ``q`` or Ctrl-C quits. Utilization is
yellow from 80% and red from 95% (``NO_COLOR`` or ``--no-color`` turns colour off).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

from poolwatch._naming import printable
from poolwatch.diagnostics import thresholds as _thresholds
from poolwatch.diagnostics.advice import Counts, ProcessCounts

WARN_AT = _thresholds.UTILIZATION_HIGH
"""Utilization from which a pool is yellow (PoolwatchPoolUtilizationHigh's threshold)."""
CRITICAL_AT = _thresholds.SATURATED
"""Utilization from which a pool is red (PoolwatchPoolSaturated's threshold)."""
PROGRESS_EVERY = 5.0
"""Seconds between progress lines when stderr is not a terminal (on one: every second)."""
SORTS = {
    "u": "utilization",
    "w": "wait_p99",
    "t": "timeouts_per_s",
    "d": "discards_per_s",
    "n": "name",
}

_RED, _YELLOW, _BOLD, _RESET = "\033[31m", "\033[33m", "\033[1m", "\033[0m"


class TopError(Exception):
    """The endpoint cannot be read (the message says why and what to check)."""


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    kind: str
    name: str
    used: int
    idle: int
    max: int | None
    pending: int
    utilization: float | None
    wait_p99: float | None
    timeouts_per_s: float | None
    discards_per_s: float | None
    leaks_active: int


def parse(text: str) -> dict[tuple[str, str], Counts]:
    """Pools in a Prometheus text exposition, by (kind, name)."""
    from prometheus_client.parser import text_string_to_metric_families

    pools: dict[tuple[str, str], Counts] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("poolwatch_"):
            continue
        for sample in family.samples:
            labels = sample.labels
            if "pool_name" not in labels:
                continue
            key = (labels.get("pool_kind", ""), labels["pool_name"])
            pool = pools.get(key)
            if pool is None:
                pool = pools[key] = Counts(*key)
            _add(pool, sample.name, labels, sample.value)
    return pools


_SUMS: dict[str, list[tuple[str | None, str | None, str]]] = {
    # sample name: [(label, value it must have, or None for any), Counts field to add to]
    "poolwatch_connections": [("state", "used", "used"), ("state", "idle", "idle")],
    "poolwatch_pending_requests": [(None, None, "pending")],
    "poolwatch_timeouts_total": [(None, None, "timeouts")],
    "poolwatch_connections_closed_total": [
        ("reason", "pool_full", "discards"),
        ("reason", "stale", "stale"),
    ],
    "poolwatch_leaks_active": [(None, None, "leaks_active")],
    "poolwatch_use_duration_seconds_sum": [(None, None, "hold_total")],
    "poolwatch_use_duration_seconds_count": [(None, None, "holds")],
    "poolwatch_connect_duration_seconds_count": [("outcome", "ok", "connects")],
    "poolwatch_wait_duration_seconds_count": [("outcome", "acquired", "checkouts")],
    "poolwatch_wait_duration_seconds_sum": [("outcome", "acquired", "wait_total")],
}


def parse_process(text: str) -> ProcessCounts | None:
    """The process view in a Prometheus text exposition; None if it has none."""
    from prometheus_client.parser import text_string_to_metric_families

    found: ProcessCounts | None = None
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("poolwatch_process_"):
            continue
        found = found or ProcessCounts()
        for sample in family.samples:
            if sample.name == "poolwatch_process_file_descriptors":
                found.file_descriptors = (found.file_descriptors or 0.0) + sample.value
            elif sample.name == "poolwatch_process_file_descriptors_max":
                found.file_descriptors_max = sample.value
            elif sample.name == "poolwatch_process_connections":
                key = (
                    sample.labels.get("network_connection_state", ""),
                    sample.labels.get("owner", ""),
                )
                found.connections[key] = found.connections.get(key, 0.0) + sample.value
    return found


def _add(pool: Counts, name: str, labels: dict[str, str], value: float) -> None:
    if name == "poolwatch_antipatterns_total":
        antipattern = labels.get("antipattern", "")
        if value > 0 and antipattern not in pool.antipatterns_stopped:
            pool.antipatterns.add(antipattern)
    elif name == "poolwatch_antipatterns_active":
        if not value:  # found earlier, no longer observed
            pool.antipatterns_stopped.add(labels.get("antipattern", ""))
            pool.antipatterns.discard(labels.get("antipattern", ""))
    elif name == "poolwatch_connections_max":
        pool.max = (pool.max or 0.0) + value
    elif name == "poolwatch_wait_duration_seconds_bucket":
        if labels.get("outcome") == "acquired":
            bound = math.inf if labels["le"] == "+Inf" else float(labels["le"])
            pool.wait_buckets[bound] = pool.wait_buckets.get(bound, 0.0) + value
    else:
        for label, wanted, attribute in _SUMS.get(name, ()):
            if label is None or labels.get(label) == wanted:
                setattr(pool, attribute, getattr(pool, attribute) + value)


def read(url: str) -> dict[tuple[str, str], Counts]:
    """The pools ``url`` serves; TopError when it cannot be read or is not Prometheus text."""
    return read_all(url)[0]


def read_all(url: str) -> tuple[dict[tuple[str, str], Counts], ProcessCounts | None]:
    """The pools ``url`` serves and its process view (None if it has none); TopError when
    it cannot be read or is not Prometheus text."""
    text = fetch(url)
    try:
        return parse(text), parse_process(text)
    except ValueError as error:  # prometheus_client's parser on anything else
        reason = str(error).strip().splitlines()[0][:80] if str(error).strip() else "unreadable"
        raise TopError(
            f"{url} does not serve metrics in the Prometheus text format ({reason}): is it a "
            "poolwatch /metrics endpoint?"
        ) from None


def countdown(seconds: float, label: str, stream: TextIO, every: float | None = None) -> None:
    """Wait ``seconds``, showing how far it got on ``stream``.

    On a terminal one line, rewritten every second (``label: 3 of 10 s …``) and ended when
    the wait is over; elsewhere (a log) a line when it starts and one every PROGRESS_EVERY
    seconds (``every`` overrides both).
    """
    tty = stream.isatty()
    every = every if every is not None else 1.0 if tty else PROGRESS_EVERY
    start = time.monotonic()
    end = start + seconds
    if tty:
        stream.write(f"\r\033[K{label}: 0 of {seconds:g} s …")
    else:
        stream.write(f"{label} for {seconds:g} s …\n")
    stream.flush()
    tick = 1
    while (now := time.monotonic()) < end:
        time.sleep(max(0.0, min(end, start + tick * every) - now))
        if time.monotonic() >= end:
            break
        done = f"{label}: {tick * every:g} of {seconds:g} s …"
        stream.write(f"\r\033[K{done}" if tty else done + "\n")
        stream.flush()
        tick += 1
    if tty:
        stream.write("\n")
        stream.flush()


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``histogram_quantile`` over cumulative buckets; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    below_bound, below_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return below_bound  # in the open bucket: its lower bound, as Prometheus does
            if count == below_count:
                return bound
            return below_bound + (bound - below_bound) * (rank - below_count) / (
                count - below_count
            )
        below_bound, below_count = bound, count
    return None


def rows(
    now: dict[tuple[str, str], Counts],
    before: dict[tuple[str, str], Counts] | None,
    seconds: float,
) -> list[Row]:
    """The table's rows: levels from ``now``, rates and p99 over the interval since ``before``."""
    out = []
    for key, pool in now.items():
        previous = before.get(key) if before is not None else None
        timeouts = discards = None
        buckets = pool.wait_buckets
        if previous is not None and seconds > 0:
            timeouts = max(pool.timeouts - previous.timeouts, 0.0) / seconds
            discards = max(pool.discards - previous.discards, 0.0) / seconds
            buckets = {
                bound: count - previous.wait_buckets.get(bound, 0.0)
                for bound, count in pool.wait_buckets.items()
            }
        limit = None if pool.max is None else round(pool.max)
        out.append(
            Row(
                kind=pool.kind,
                name=pool.name,
                used=round(pool.used),
                idle=round(pool.idle),
                max=limit,
                pending=round(pool.pending),
                utilization=pool.used / pool.max if pool.max else None,
                wait_p99=quantile(0.99, buckets),
                timeouts_per_s=timeouts,
                discards_per_s=discards,
                leaks_active=round(pool.leaks_active),
            )
        )
    return out


def ordered(table: list[Row], sort: str, reverse: bool = False) -> list[Row]:
    """Rows sorted by a column of SORTS: worst first (no value last), name alphabetically;
    ``reverse`` puts the worst last."""
    attribute = SORTS[sort]
    if attribute == "name":
        return sorted(table, key=lambda r: (r.name, r.kind), reverse=reverse)

    def key(row: Row) -> tuple[float, str]:  # ties by name, alphabetically, either way
        value = getattr(row, attribute)
        value = -1.0 if value is None else value
        return (value if reverse else -value, row.name)

    return sorted(table, key=key)


def _bar(utilization: float | None, width: int = 10) -> str:
    if utilization is None:
        return "-".ljust(width)
    filled = min(width, round(width * utilization))
    return "#" * filled + "." * (width - filled)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


HEADER = (
    f"{'POOL':<36} {'KIND':<12} {'USED/MAX':>9} {'UTIL':<10} {'%':>4} {'IDLE':>4} "
    f"{'PEND':>4} {'WAIT P99':>9} {'TMO/S':>6} {'DISC/S':>6} {'LEAKS':>5}"
)


def render(table: Sequence[Row], *, colour: bool) -> str:
    """The table, one line per pool; utilization coloured at WARN_AT and CRITICAL_AT."""
    lines = [(_BOLD + HEADER + _RESET) if colour else HEADER]
    for r in table:
        limit = "-" if r.max is None else str(r.max)
        percent = "-" if r.utilization is None else f"{r.utilization * 100:.0f}"
        p99 = "-" if r.wait_p99 is None else f"{r.wait_p99 * 1000:.1f}ms"
        name, kind = printable(r.name), printable(r.kind)  # one line per pool, always
        name = name if len(name) <= 36 else "…" + name[-35:]
        util = f"{_bar(r.utilization)} {percent:>4}"
        if colour and r.utilization is not None and r.utilization >= WARN_AT:
            tint = _RED if r.utilization >= CRITICAL_AT else _YELLOW
            util = tint + util + _RESET
        lines.append(
            f"{name:<36} {kind:<12} {f'{r.used}/{limit}':>9} {util} {r.idle:>4} "
            f"{r.pending:>4} {p99:>9} {_rate(r.timeouts_per_s):>6} "
            f"{_rate(r.discards_per_s):>6} {r.leaks_active:>5}"
        )
    if not table:
        lines.append("(no poolwatch pools at this endpoint yet)")
    return "\n".join(lines)


def fetch(url: str, timeout: float = 5.0) -> str:
    """The exposition text at ``url``; TopError with the reason otherwise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
    except urllib.error.HTTPError as error:
        raise TopError(f"{url} answered HTTP {error.code}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise TopError(f"cannot read {url}: {reason}") from None
    return body.decode("utf-8", "replace")


@contextlib.contextmanager
def _keys(stream: TextIO) -> Iterator[bool]:
    """Single-key input on a terminal (cbreak mode), restored on exit; False if no tty."""
    if not stream.isatty():
        yield False
        return
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_key(stream: TextIO, wait: float) -> str | None:
    ready, _, _ = select.select([stream], [], [], max(wait, 0.0))
    return stream.read(1) if ready else None


def run(
    url: str,
    *,
    interval: float,
    sort: str,
    once: bool,
    colour: bool | None,
    out: TextIO,
    keys_in: TextIO | None = None,
    progress: TextIO | None = None,
) -> int:
    """Show the table every ``interval`` seconds until ``q`` or Ctrl-C (or once).

    ``--once`` reads twice, ``interval`` apart, with progress on ``progress`` (stderr).
    """
    progress = progress if progress is not None else sys.stderr
    keys_in = keys_in if keys_in is not None else sys.stdin
    interactive = out.isatty() and not once
    if colour is None:
        colour = out.isatty() and "NO_COLOR" not in os.environ
    before: dict[tuple[str, str], Counts] | None = None
    taken = time.monotonic()
    reverse = False
    if once:  # two scrapes an interval apart, so that rates and p99 are current
        before, taken = read(url), time.monotonic()
        countdown(interval, f"poolwatch top: reading {url}", progress)
    with _keys(keys_in) if interactive else contextlib.nullcontext(False) as has_keys:
        while True:
            now, at = read(url), time.monotonic()
            table = ordered(rows(now, before, at - taken), sort, reverse)
            frame = render(table, colour=colour)
            if interactive:
                stamp = time.strftime("%H:%M:%S")
                title = f"poolwatch top — {url} — {stamp} — sort: {SORTS[sort]}"
                out.write("\033[H\033[2J" + title + "  (u w t d n sort, r reverse, q quit)\n\n")
            out.write(frame + "\n")
            out.flush()
            if once:
                return 0
            before, taken = now, at
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                key = _read_key(keys_in, left) if has_keys else None
                if key is None:
                    if not has_keys:
                        time.sleep(left)
                    continue
                if key in ("q", "\x03"):
                    return 0
                if key in SORTS:
                    sort = key
                    break
                if key == "r":
                    reverse = not reverse
                    break
