"""Per-pool hot-path state: plain counters, fixed-bucket histograms, the checkout table.

This is the only poolwatch code that runs on the application's thread for every checkout
and return. It does no OpenTelemetry call, no allocation beyond a dict slot, and no I/O:
a bucket index by bisection, a few integer and float updates, under one uncontended lock
so that counts stay exact with any number of threads. Everything else — levels,
exporting, leak scans — happens at collection time on the exporter's thread.
"""

from __future__ import annotations

import contextvars
import os
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Hashable, Mapping
from math import inf
from types import CodeType, FrameType
from typing import NamedTuple, Protocol

from poolwatch import _catalogue as c


class Histogram:
    """Explicit-bucket histogram; bucket ``i`` counts values in ``(bounds[i-1], bounds[i]]``."""

    __slots__ = ("bounds", "counts", "max", "min", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.min = inf
        self.max = -inf

    def observe(self, value: float) -> None:
        """Add one value (the caller holds the ledger's lock)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def snapshot(self) -> HistogramSnapshot:
        """An immutable copy (the caller holds the ledger's lock)."""
        counts = tuple(self.counts)
        return HistogramSnapshot(self.bounds, counts, self.total, self.min, self.max, sum(counts))


class HistogramSnapshot(NamedTuple):
    """A histogram's cumulative state at one moment (a tuple: cheap to make per collection)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float
    min: float
    max: float
    observations: int
    """Number of values observed (the sum of ``counts``, kept: read at every collection)."""

    def quantile(self, q: float) -> float | None:
        """Estimate the ``q`` quantile by linear interpolation inside its bucket."""
        n = self.observations
        if n == 0:
            return None
        rank = q * n
        seen = 0
        for i, count in enumerate(self.counts):
            if count and seen + count >= rank:
                lower = self.bounds[i - 1] if i > 0 else 0.0
                upper = self.bounds[i] if i < len(self.bounds) else self.max
                lower = max(lower, self.min)
                upper = min(upper, self.max)
                return lower + (upper - lower) * ((rank - seen) / count)
            seen += count
        return self.max


class Exemplar(NamedTuple):
    """A measurement kept with the trace it happened in (a slow wait's, a slow connect's)."""

    value: float
    time_unix_nano: int
    trace_id: int
    span_id: int


SpanIds = tuple[int, int]
"""(trace id, span id) of a span recorded for a wait or a connect."""

ConnectRecord = tuple[float, float, bool]
"""A connect made inside a wait: its start and end (``perf_counter()``) and whether it
succeeded."""


class WaitTracer(Protocol):
    """What records waits and connects as spans (``_tracing.Tracing``: the ledger knows no
    OpenTelemetry). Called on the caller's thread, in its context, after the fact."""

    def wait(
        self,
        attributes: Mapping[str, str | int],
        start: float,
        end: float,
        outcome: str,
        connect: ConnectRecord | None,
    ) -> tuple[SpanIds, SpanIds | None] | None:
        """A wait from ``start`` to ``end`` (``perf_counter()``), with the connect made
        inside it if any: the ids of its span and of the connect's, or None (not recorded)."""

    def connect(
        self, attributes: Mapping[str, str | int], start: float, end: float, ok: bool
    ) -> SpanIds | None:
        """A connect from ``start`` to ``end``, outside any wait: its span's ids, or None."""


_inner_connect: contextvars.ContextVar[ConnectRecord | None] = contextvars.ContextVar(
    "poolwatch_inner_connect", default=None
)
"""The last connect made in this thread or task by a pool that connects inside its wait
(SQLAlchemy, aiohttp), for the wait's span to show it as a child."""


class LedgerSnapshot(NamedTuple):
    """Everything a ledger counted, copied consistently at one moment."""

    wait: dict[str, HistogramSnapshot]
    """By outcome: acquired always; timeout and error once they happened."""
    use: HistogramSnapshot
    connect: dict[str, HistogramSnapshot]
    """By outcome: ok always; error once it happened."""
    lifetime: dict[str, HistogramSnapshot]
    """By close reason, once connections were closed for it."""
    closed: dict[str, int]
    timeouts: int
    leaks: int
    leaks_active: int
    checked_out: int
    """Checkouts not yet returned, as seen by the hooks."""
    reused: int = 0
    """Successful checkouts that did not open a connection: served by one already open."""
    exemplars: Mapping[str, tuple[Exemplar, ...]] = {}
    """By histogram (``wait acquired``, ``wait timeout``, ``wait error``, ``connect ok``,
    ``connect error``): the latest slow measurement of each bucket, with its span."""

    @property
    def checkouts(self) -> int:
        """Successful checkouts."""
        return self.wait[c.OUTCOME_ACQUIRED].observations


Stack = tuple[tuple[CodeType, int], ...]
"""A borrower's stack as captured: (code, instruction offset), innermost first."""

STACK_DEPTH = 16
"""Frames kept per captured stack."""

_POOLWATCH_DIR = os.path.dirname(os.path.abspath(__file__))


def capture_stack(frame: FrameType | None) -> Stack:
    """The stack from ``frame`` outwards, as cheaply as Python allows: a code object and
    an instruction offset per frame; files and lines are worked out only when logged."""
    frames: list[tuple[CodeType, int]] = []
    append = frames.append
    depth = 0
    while frame is not None and depth < STACK_DEPTH:
        append((frame.f_code, frame.f_lasti))
        frame = frame.f_back
        depth += 1
    return tuple(frames)


def render_stack(stack: Stack) -> str:
    """Traceback-style lines, outermost first, poolwatch's own frames left out."""
    lines = []
    for code, offset in reversed(stack):
        if code.co_filename.startswith(_POOLWATCH_DIR):
            continue
        line = next(
            (n for start, end, n in code.co_lines() if start <= offset < end and n is not None),
            code.co_firstlineno,
        )
        lines.append(f'  File "{code.co_filename}", line {line}, in {code.co_name}\n')
    return "".join(lines)


class LeakReport(NamedTuple):
    """A leak for the log: found while out, or a leaked checkout coming back."""

    held: float
    """Seconds the connection had been out."""
    stack: Stack | None
    """Where it was checked out, when the stack was captured."""
    returned: bool = False
    counted: bool = False
    """Counted as a leak only now, at its return (it was out less than a collection)."""
    collected: bool = False
    """The borrower dropped it without returning it: garbage-collected while checked out."""


def _own_references() -> int:
    """The reference count ``Ledger.orphans`` sees for a key only ``active`` holds:
    measured with the loop it uses, on an object nothing else references."""

    class Probe:
        pass

    active = {Probe(): 0.0}
    for key, _start in list(active.items()):
        return sys.getrefcount(key)
    raise AssertionError("unreachable")


UNKNOWN_LIFETIME = -1.0
"""A pending close whose connection's birth poolwatch did not see (opened before it)."""

DRAIN_AT = 16384
"""Pending values (of every list together) past which the janitor (``_janitor.py``) folds a
ledger between collections."""


class Ledger:
    """Counters and histograms for one pool series, shared by its pool instances.

    Hot path: ``acquired`` and ``released`` only append a float to a list and set or pop
    one dict key — single C operations, atomic under the GIL and internally locked on
    free-threaded builds — so counts stay exact without taking a lock. The pending
    values are bucketed in bulk (sort, then one bisection per bucket boundary) at
    collection time, or by the janitor thread once ``DRAIN_AT`` values are waiting.
    Successful connects and closes are appended the same way: a server that closes every
    connection makes one of each per request, and a lock and a histogram update cost
    several times what an append does (measured with valgrind: ~9,000 instructions against
    a few hundred).

    Rare events (timeouts, failed connects, leaks) and bucketing take a re-entrant lock:
    re-entrant because a garbage-collected connection can be returned by a finalizer
    that runs on whichever thread is allocating, possibly one already holding the lock.
    """

    __slots__ = (
        "_auto_stacks",
        "_changes",
        "_firsts",
        "_last",
        "_leaked",
        "_lock",
        "_reports",
        "_reused",
        "_suspects",
        "active",
        "capture",
        "closed",
        "closes",
        "connect",
        "connects",
        "connects_in_checkout",
        "connects_in_wait",
        "exemplars",
        "firsts",
        "leak_threshold",
        "leaks",
        "lifetime",
        "lifetime_bounds",
        "span_threshold",
        "stacks",
        "tells_firsts",
        "timeouts",
        "trace_attributes",
        "tracer",
        "use",
        "uses",
        "wait",
        "waits",
    )

    def __init__(
        self,
        bounds: tuple[float, ...] = c.DURATION_BUCKETS,
        lifetime_bounds: tuple[float, ...] = c.LIFETIME_BUCKETS,
        leak_threshold: float | None = None,
        leak_stacks: str = "auto",
        *,
        connects_in_checkout: bool = False,
        tells_firsts: bool = False,
    ) -> None:
        self._lock = threading.RLock()
        self.connects_in_checkout = connects_in_checkout
        """Whether its pools open a connection inside the checkout (a failed connect fails
        the checkout) rather than after it (``Adapter.connects_in_checkout``)."""
        self.tells_firsts = tells_firsts
        """Whether its pools' hooks tell each connection's first checkout
        (``Adapter.tells_firsts``): the reuse count is then checkouts less first checkouts
        (``firsts``), not less connects (``_reuses``)."""
        self.firsts: list[None] = []
        """One entry per checkout that was its connection's first, not counted yet (the
        hooks of pools whose ledger ``tells_firsts`` tell them; the others never do)."""
        self._firsts = 0
        """First checkouts counted (folded from ``firsts``)."""
        self.connects_in_wait = False
        """Whether that connect is part of the caller's wait (``Adapter.connects_in_wait``):
        then a slow wait's span shows it as a child, else a slow connect has a span of its
        own. A hook that knows better for one connect says so (``in_wait``)."""
        self.span_threshold = inf
        """Waits and connects longer than this (seconds) are recorded as spans (inf: none):
        the one comparison the hot path makes for tracing."""
        self.tracer: WaitTracer | None = None
        self.trace_attributes: Mapping[str, str | int] = {}
        """Attributes of its spans: the pool's name and kind, and its server."""
        self.exemplars: dict[str, dict[int, Exemplar]] = {}
        """By histogram (see ``LedgerSnapshot.exemplars``), by bucket: the latest."""
        self.capture = leak_stacks == "always"
        """Whether checkouts record the borrower's stack (hot path: one attribute read)."""
        self._auto_stacks = leak_stacks == "auto"
        self.stacks: dict[Hashable, Stack] = {}
        """Borrowers' stacks of checkouts out now, while ``capture`` is on."""
        self._reports: list[LeakReport] = []
        self.leak_threshold = inf if leak_threshold is None else leak_threshold
        self.wait = {outcome: Histogram(bounds) for outcome in c.WAIT_OUTCOMES}
        self.use = Histogram(bounds)
        self.connect = {outcome: Histogram(bounds) for outcome in c.CONNECT_OUTCOMES}
        self.lifetime_bounds = lifetime_bounds
        self.lifetime: dict[str, Histogram] = {}
        """By close reason, created at the first close for it."""
        # Every reason exists from the start: no allocation under the lock later.
        self.closed = dict.fromkeys(c.CLOSE_REASONS, 0)
        self.timeouts = 0
        self.leaks = 0
        self.waits: list[float] = []
        self.uses: list[float] = []
        self.connects: list[float] = []
        """Durations of successful connects, not bucketed yet."""
        self.closes: dict[str, list[float]] = {reason: [] for reason in c.CLOSE_REASONS}
        """Lifetimes of closes by reason (``UNKNOWN_LIFETIME`` when unknown), not counted yet:
        one list per reason, so that a close is one append and allocates nothing."""
        self.active: dict[Hashable, float] = {}
        self._leaked: set[Hashable] = set()
        self._changes = 0
        """Bumped under the lock by every event that does not go through the hot path."""
        self._last: tuple[LedgerSnapshot, int] | None = None
        """The last snapshot taken with nothing out, and ``_changes`` when it was taken: one
        tuple, so that a reader reads the two together (see ``snapshot``)."""
        self._reused = 0
        """The highest reuse count exported: it only grows (see ``snapshot``)."""
        self._suspects: dict[int, float] = {}
        """Checkouts nothing else referenced at the last sweep, by id: checkout time."""

    # -- hot path: every checkout and return -------------------------------------------
    # THE HOT-PATH CONTRACT. ``acquired``, ``released``, ``connected(ok=True)`` and
    # ``closed_connection`` below are its one definition. An adapter whose hook is hot
    # enough that a method call shows in its benchmark (every adapter's checkout and return
    # hooks: two method calls cost 0.25 µs of a ~1 µs budget, measured) inlines exactly
    # their statements, and says so where it does. One variation is allowed: an adapter may
    # keep a checkout's time on the library's own object instead of in ``active`` (aiohttp,
    # httpx: a dict set and pop cost about a third of their hooks' time inside a request)
    # if its ``Adapter.checkouts`` reads what is out from the pools at collection.
    # tests/test_contract.py drives every adapter through a checkout and return, a failed
    # checkout, a timeout and a late return, and checks that its ledger ends as this
    # reference leaves one.
    def acquired(
        self,
        key: Hashable,
        start: float,
        end: float,
        borrower: FrameType | None = None,
        first: bool = False,
    ) -> None:
        """A caller got connection ``key`` after waiting from ``start`` to ``end``;
        ``borrower``: its frame, whose stack is kept while ``capture`` is on; ``first``:
        the connection's first checkout (told by the hooks of pools whose ledger
        ``tells_firsts``).

        Out first, counted second: a collection between the two sees a checkout out and
        not yet counted, never one counted and not out — the reuse count (checkouts less
        those that connect, or are out and connecting; or less first checkouts) is then at
        worst too low for an instant, never too high, and it never goes down once
        exported. A first checkout is told before the checkout is counted, for the same
        reason."""
        self.active[key] = end
        if first:
            self.firsts.append(None)
        self.waits.append(end - start)
        if end - start > self.span_threshold:  # a wait that waited: a span
            self.slow_wait(start, end, c.OUTCOME_ACQUIRED)
        if self.capture:  # this pool has leaked (or leak_stacks="always")
            self.stacks[key] = capture_stack(borrower)

    def released(self, key: Hashable, now: float) -> None:
        """Connection ``key`` came back to the pool at ``now``."""
        start = self.active.pop(key, None)
        if start is None:
            return
        held = now - start
        self.uses.append(held)
        if held > self.leak_threshold:
            self.settle(key, held)
        elif self.stacks:
            self.stacks.pop(key, None)

    def settle(self, key: Hashable, held: float) -> None:
        """After a return held past the leak threshold: count the leak, once."""
        with self._lock:
            self._changes += 1
            self.active.pop(key, None)
            stack = self.stacks.pop(key, None)
            if key in self._leaked:
                self._leaked.discard(key)  # already counted while it was out
                self._reports.append(LeakReport(held, None, returned=True))
            else:
                self.leaks += 1
                self._reports.append(LeakReport(held, stack, returned=True, counted=True))
                if self._auto_stacks:
                    self.capture = True

    # -- less frequent events ----------------------------------------------------------
    def failed(self, start: float, end: float, *, timeout: bool) -> None:
        """A caller gave up (``timeout``) or failed getting a connection."""
        outcome = c.OUTCOME_TIMEOUT if timeout else c.OUTCOME_ERROR
        with self._lock:
            self._changes += 1
            self.wait[outcome].observe(end - start)
            if timeout:
                self.timeouts += 1
        if end - start > self.span_threshold:
            self.slow_wait(start, end, outcome)

    def connected(self, duration: float, *, ok: bool, in_wait: bool | None = None) -> None:
        """A new connection was opened (``ok``) or failed to open, taking ``duration``, just
        now; ``in_wait``: whether inside a caller's wait (None: ``connects_in_wait``).

        A successful connect is deferred like a wait (one append): a server that closes
        every connection makes a connect, and a close, per request.
        """
        if ok:
            self.connects.append(duration)
        else:
            with self._lock:
                self._changes += 1
                self.connect[c.CONNECT_ERROR].observe(duration)
        if self.tracer is not None:
            end = time.perf_counter()
            self.slow_connect(end - duration, end, ok, in_wait)

    # -- traces: after the fact, for what was slow -------------------------------------
    def slow_wait(self, start: float, end: float, outcome: str) -> None:
        """A wait past ``span_threshold`` (the caller checked): its span, as a child of the
        caller's, with the connect made inside it; its exemplars. Never raises."""
        tracer = self.tracer
        if tracer is None:
            return
        connect = _inner_connect.get()
        if connect is not None:
            _inner_connect.set(None)
            if not start <= connect[0] <= end:
                connect = None  # made outside this wait
        try:
            recorded = tracer.wait(self.trace_attributes, start, end, outcome, connect)
        except Exception:  # never the application's failure (a tracing SDK's own bug)
            return
        if recorded is not None:
            wait_ids, connect_ids = recorded
            self._keep_exemplar(f"wait {outcome}", self.wait[outcome], end - start, wait_ids)
            if connect is not None and connect_ids is not None:
                outcome = c.CONNECT_OK if connect[2] else c.CONNECT_ERROR
                duration = connect[1] - connect[0]
                self._keep_exemplar(
                    f"connect {outcome}", self.connect[outcome], duration, connect_ids
                )

    def slow_connect(self, start: float, end: float, ok: bool, in_wait: bool | None = None) -> None:
        """A connect just made: kept for its wait's span where the connect is part of the
        wait (``in_wait``; None: ``connects_in_wait``); else, past ``span_threshold``, a
        span of its own and an exemplar."""
        tracer = self.tracer
        if tracer is None:
            return
        if self.connects_in_wait if in_wait is None else in_wait:
            _inner_connect.set((start, end, ok))
            return
        if end - start <= self.span_threshold:
            return
        try:
            ids = tracer.connect(self.trace_attributes, start, end, ok)
        except Exception:
            return
        if ids is not None:
            outcome = c.CONNECT_OK if ok else c.CONNECT_ERROR
            self._keep_exemplar(f"connect {outcome}", self.connect[outcome], end - start, ids)

    def _keep_exemplar(self, histogram: str, into: Histogram, value: float, ids: SpanIds) -> None:
        bucket = bisect_left(into.bounds, value)
        exemplar = Exemplar(value, time.time_ns(), ids[0], ids[1])
        with self._lock:
            self._changes += 1
            self.exemplars.setdefault(histogram, {})[bucket] = exemplar

    def closed_connection(self, reason: str, lifetime: float | None) -> None:
        """The pool closed a connection for ``reason`` (a catalogue reason) after ``lifetime``;
        counted at the next fold (one append here, as for a connect)."""
        self.closes[reason].append(UNKNOWN_LIFETIME if lifetime is None else lifetime)

    def collected(self, key: Hashable, held: float) -> None:
        """The borrower of checkout ``key`` dropped it without returning it (the garbage
        collector found it): its use ends after ``held`` seconds, and it counts as a leak,
        once. ``key`` may already be out of ``active`` (a hook that popped it first)."""
        with self._lock:
            self._changes += 1
            self.active.pop(key, None)
            stack = self.stacks.pop(key, None)
            self.uses.append(held)
            counted = key not in self._leaked
            self._leaked.discard(key)
            if counted:
                self.leaks += 1
            self._reports.append(
                LeakReport(held, stack, returned=True, counted=counted, collected=True)
            )
            if self._auto_stacks:
                self.capture = True

    def orphans(
        self, extra_references: int = 0, active: dict[Hashable, float] | None = None
    ) -> list[Hashable]:
        """Checkouts that nothing but this ledger references any more (CPython reference
        counts), confirmed at two sweeps in a row: their borrower dropped them without
        returning them. ``extra_references``: references the library itself keeps to a
        checked-out key. ``active``: the checkouts out, when the adapter reads them from its
        pools (``Adapter.checkouts``; held by one dict, as the ledger's own table is). The
        caller settles each with :meth:`collected`.

        The second sweep rules out the instant in which a returned key is neither in
        ``active`` nor back in its pool: a key is an orphan only if it was out, with the
        same checkout time, and unreferenced at both.
        """
        active = self.active if active is None else active
        if not active and not self._suspects:
            return []
        getrefcount = sys.getrefcount
        confirmed: list[Hashable] = []
        suspects: dict[int, float] = {}
        previous = self._suspects
        for key, start in list(active.items()):
            own = _OWN_REFERENCES + extra_references
            own += (key in self.stacks) + (key in self._leaked)
            if getrefcount(key) <= own and active.get(key) == start:
                if previous.get(id(key)) == start:
                    confirmed.append(key)
                else:
                    suspects[id(key)] = start
        self._suspects = suspects
        return confirmed

    def forget(self, key: Hashable) -> None:
        """Drop ``key`` from the checkout table without recording a use (detached)."""
        self.active.pop(key, None)
        self.stacks.pop(key, None)
        with self._lock:
            self._changes += 1
            self._leaked.discard(key)

    def sweep(self, now: float, active: dict[Hashable, float] | None = None) -> list[LeakReport]:
        """Count the checkouts out past the leak threshold at ``now`` as leaks, each once, and
        hand over every leak report since the last sweep (found out now, or returned late)
        for the log. ``active``: the checkouts out, when the adapter reads them from its
        pools (``Adapter.checkouts``); else the ledger's own table.

        The one step of a collection round that writes into the ledger on purpose: reading
        it (:meth:`snapshot`) changes nothing anyone can see.
        """
        threshold = self.leak_threshold
        active = self.active if active is None else active
        found = [(k, s) for k, s in list(active.items()) if now - s > threshold]
        if not found and not self._reports:
            return []
        with self._lock:
            for key, start in found:
                if key not in self._leaked and active.get(key) == start:
                    self._changes += 1
                    self._leaked.add(key)
                    self.leaks += 1
                    self._reports.append(LeakReport(now - start, self.stacks.get(key)))
                    if self._auto_stacks:
                        self.capture = True  # this pool leaks: name the next borrower
            reports, self._reports = self._reports, []
            return reports

    @property
    def has_reports(self) -> bool:
        """Whether leak reports wait for the next :meth:`sweep` (returns counted late)."""
        return bool(self._reports)

    # -- collection time ---------------------------------------------------------------
    def drain(self) -> None:
        """Bucket the values the hot path left pending."""
        with self._lock:
            self._fold_pending()

    def _fold_pending(self) -> None:
        """Fold every pending list (the caller holds the lock). Folding is a change: a
        snapshot cached before it no longer stands for the ledger (``snapshot``)."""
        if self.pending:
            self._changes += 1
        _fold(self.waits, self.wait[c.OUTCOME_ACQUIRED])
        firsts = self.firsts
        if firsts:  # after the waits: a first checkout is told before it is counted
            n = len(firsts)
            del firsts[:n]
            self._firsts += n
        _fold(self.uses, self.use)
        _fold(self.connects, self.connect[c.CONNECT_OK])
        for reason, pending in self.closes.items():
            n = len(pending)
            if not n:
                continue
            batch = pending[:n]  # appends land after it: nothing is lost (see _fold)
            del pending[:n]
            self.closed[reason] += n
            lifetimes = [value for value in batch if value >= 0]
            if lifetimes:
                histogram = self.lifetime.get(reason)
                if histogram is None:
                    histogram = self.lifetime[reason] = Histogram(self.lifetime_bounds)
                _fold(lifetimes, histogram)

    @property
    def pending(self) -> int:
        """Values waiting to be folded (the janitor folds past ``DRAIN_AT``)."""
        closes = sum(len(pending) for pending in self.closes.values())
        firsts = len(self.firsts)
        return len(self.waits) + len(self.uses) + len(self.connects) + closes + firsts

    def snapshot(
        self,
        now: float | None = None,
        active: dict[Hashable, float] | None = None,
        unconnected: int = 0,
    ) -> LedgerSnapshot:
        """Copy every counter: what the pool's hooks recorded, as of now. ``active``: the
        checkouts out, when the adapter reads them from its pools (``Adapter.checkouts``);
        ``unconnected``: how many of them have a connect still to be counted
        (``Adapter.unconnected``).

        The ledger's own bookkeeping happens here, and nothing a reader can see changes
        but by growing: pending values are folded into their histograms, and the reuse
        count's highest value is kept (it never goes down). Leaks are counted by
        :meth:`sweep`.
        """
        now = time.perf_counter() if now is None else now
        threshold = self.leak_threshold
        active = (self.active if active is None else active).copy()
        last = self._last
        # Nothing out, nothing pending, no rare event and no fold since the cached snapshot
        # was taken: unchanged. Most pools of a process with many are idle between
        # collections. The snapshot and its count of changes are read together, before
        # the pending lists: another reader (or the janitor) folding them meanwhile has
        # counted a change, so a snapshot older than its fold is never taken for current.
        if (
            last is not None
            and not active
            and not self.waits
            and not self.uses
            and not self.connects
            and not self.firsts
            and not any(self.closes.values())
            and last[1] == self._changes
        ):
            return last[0]
        leaks_active = sum(1 for start in active.values() if now - start > threshold)
        with self._lock:
            self._fold_pending()
            snapshot = LedgerSnapshot(
                wait={
                    k: h.snapshot()
                    for k, h in self.wait.items()
                    if k == c.OUTCOME_ACQUIRED or h.max >= h.min
                },
                use=self.use.snapshot(),
                connect={
                    k: h.snapshot()
                    for k, h in self.connect.items()
                    if k == c.CONNECT_OK or h.max >= h.min
                },
                # list(): one C call, safe from a finalizer adding a reason meanwhile
                lifetime={k: h.snapshot() for k, h in list(self.lifetime.items())},
                closed=dict(self.closed),
                timeouts=self.timeouts,
                leaks=self.leaks,
                leaks_active=leaks_active,
                checked_out=len(active),
                reused=self._reuses(unconnected),
                exemplars={
                    k: tuple(v[b] for b in sorted(v)) for k, v in list(self.exemplars.items())
                },
            )
            if not active:  # the cached snapshot stands only for a ledger with nothing out
                self._last = (snapshot, self._changes)
            return snapshot

    def _reuses(self, unconnected: int) -> int:
        """Checkouts that opened no connection (the caller holds the lock).

        Where the hooks tell each connection's first checkout (``tells_firsts``: SQLAlchemy,
        aiohttp, redis-py, psycopg_pool, asyncpg), every other checkout reused a
        connection. Checkouts less connects is not the count there: pools that open
        connections ahead of demand (psycopg_pool's and asyncpg's ``min_size``, connections
        opened in the background) make connects no checkout asked for; one SQLAlchemy
        checkout can make two (it reconnects when its pre-ping or a ``checkout`` listener
        finds the connection dead); and a connect can succeed while its checkout fails (a
        SQLAlchemy ``checkout`` listener or an aiohttp trace callback raising after it,
        redis-py finding unread data on a connection it just opened). The difference then
        drifts below the truth for good, and the exported count, which keeps its highest
        value, reads above it until the reuses catch up (seen under load on PostgreSQL with
        backends being killed).

        The others (urllib3, httpx) open a connection after the checkout, for the request
        that needs it, once: a checkout reused a connection unless a connect (successful or
        not) was counted for it. For httpx the checkout is counted when the connection
        accepts the request (``_accepted``), after its connect, so only successful connects
        are subtracted (``connects_in_checkout``). For urllib3 a checkout out now whose
        connect has not been counted yet (``unconnected``: it is connecting, or about to)
        is not a reuse either, though nothing says so yet: left in, it read as one until
        its connect was counted, and the count, which never goes down, kept it. A count
        caught between two steps is only ever too low, and the exported count waits for
        the next collection.
        """
        if self.tells_firsts:
            reused = sum(self.wait[c.OUTCOME_ACQUIRED].counts) - self._firsts
            self._reused = max(self._reused, reused)
            return self._reused
        opened = sum(self.connect[c.CONNECT_OK].counts)
        if not self.connects_in_checkout:
            opened += sum(self.connect[c.CONNECT_ERROR].counts)
        reused = sum(self.wait[c.OUTCOME_ACQUIRED].counts) - opened - unconnected
        self._reused = max(self._reused, reused)
        return self._reused

    def reset(self) -> None:
        """Start from zero (a forked child); also replaces a lock a dead thread may hold."""
        fresh = Ledger(
            self.use.bounds,
            self.lifetime_bounds,
            None,
            connects_in_checkout=self.connects_in_checkout,
            tells_firsts=self.tells_firsts,
        )
        fresh.leak_threshold = self.leak_threshold
        fresh.capture, fresh._auto_stacks = self.capture, self._auto_stacks
        fresh.connects_in_wait, fresh.span_threshold = self.connects_in_wait, self.span_threshold
        fresh.tracer, fresh.trace_attributes = self.tracer, self.trace_attributes
        for name in Ledger.__slots__:
            setattr(self, name, getattr(fresh, name))


def _fold(pending: list[float], histogram: Histogram) -> None:
    """Move ``pending`` values into ``histogram`` (the caller holds the ledger's lock).

    Appenders only ever add at the end, so copying the first ``n`` values and then
    deleting exactly those loses nothing that is appended in between.
    """
    n = len(pending)
    if not n:
        return
    batch = pending[:n]
    del pending[:n]
    batch.sort()
    counts = histogram.counts
    below = 0
    for i, bound in enumerate(histogram.bounds):
        upto = bisect_right(batch, bound)
        counts[i] += upto - below
        below = upto
    counts[-1] += n - below
    histogram.total += sum(batch)
    histogram.min = min(histogram.min, batch[0])
    histogram.max = max(histogram.max, batch[-1])


_OWN_REFERENCES = _own_references()
