"""The floor under any hook that times a pool's waits and uses, to measure poolwatch against.

Issue 20 set a target of at most 1 µs added per acquire+release. A hook that reports how
long a caller waited and how long it held the connection cannot do less than this pair
does: a frame around the library's acquire and one around its release, a clock read
before and after the acquire and one at the release, the checkout's time kept by
connection, and the two durations appended to a list. No guards, no per-pool ledger, no
leak, trace or reuse checks: not an instrumentation anyone could ship, only the least one
could. Timed side by side with bare and poolwatch (a third variant of the same rows), it
tells how much of what poolwatch adds is the floor, which no bookkeeping could remove,
and how much is poolwatch's own.

A fourth variant, ``frames``, is the floor's pair with its three clock reads left out (the
same frames, dict set and pop and appends, of a constant): the floor minus it is what the
three clock reads cost inside the library's acquire+release, where the target is read.
``clock_read_ns`` times one ``perf_counter()`` read in a tight loop beside it: on a virtual
machine whose hypervisor traps the processor's time-stamp counter, a read costs several
times what it does on bare metal, and no hook can time a wait and a use without three.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from time import perf_counter, perf_counter_ns
from typing import Any

from _common import Summary, paired_differences, summarize

VARIANTS = ("bare", "poolwatch", "floor", "frames")
"""The variants of a row timed against the floor, in the order ``interleave`` rotates."""


class Timed(list[float]):
    """The durations the floor's hooks recorded (none for another variant)."""

    def __init__(self, label: str, hooked: bool) -> None:
        super().__init__()
        self.label, self.hooked = label, hooked

    def check(self, ops: int) -> None:
        """Every acquire and release of ``ops`` was timed (by the floor's hooks alone)."""
        wanted = 2 * ops if self.hooked else 0
        if len(self) != wanted:
            raise RuntimeError(f"{self.label}: {len(self)} durations for {ops} acquire+release")


Hook = Callable[..., Any]


@contextmanager
def floor_hooks(variant: str, cls: type, acquire: str, release: str) -> Iterator[Timed]:
    """For variants ``floor`` and ``frames``: ``cls.acquire``/``cls.release`` (functions of
    the class itself, the acquire called with ``self`` alone; coroutine functions for an
    asyncio pool, replaced by coroutine functions) replaced by the floor's pair
    (``frames``: without its clock reads) while the block runs. Yields what the pair
    recorded; for any other variant, nothing is replaced."""
    timed = Timed(f"{cls.__name__} {variant}", variant in ("floor", "frames"))
    if not timed.hooked:
        yield timed
        return
    get: Hook = cls.__dict__[acquire]
    put: Hook = cls.__dict__[release]
    make = _async_pair if inspect.iscoroutinefunction(get) else _sync_pair
    acquire_hook, release_hook = make(get, put, timed.append, clocked=variant == "floor")
    setattr(cls, acquire, acquire_hook)
    setattr(cls, release, release_hook)
    try:
        yield timed
    finally:
        setattr(cls, acquire, get)
        setattr(cls, release, put)


def _sync_pair(get: Hook, put: Hook, append: Hook, *, clocked: bool) -> tuple[Hook, Hook]:
    out: dict[Any, float] = {}

    def acquire_hook(self: Any) -> Any:
        start = perf_counter()
        conn = get(self)
        now = perf_counter()
        out[conn] = now
        append(now - start)
        return conn

    def release_hook(self: Any, conn: Any) -> Any:
        start = out.pop(conn, None)
        if start is not None:
            append(perf_counter() - start)
        return put(self, conn)

    def acquire_frame(self: Any) -> Any:
        start = 0.0
        conn = get(self)
        now = 1.0
        out[conn] = now
        append(now - start)
        return conn

    def release_frame(self: Any, conn: Any) -> Any:
        start = out.pop(conn, None)
        if start is not None:
            append(2.0 - start)
        return put(self, conn)

    return (acquire_hook, release_hook) if clocked else (acquire_frame, release_frame)


def _async_pair(get: Hook, put: Hook, append: Hook, *, clocked: bool) -> tuple[Hook, Hook]:
    """:func:`_sync_pair` as coroutine functions, awaiting the library's."""
    out: dict[Any, float] = {}

    async def acquire_hook(self: Any) -> Any:
        start = perf_counter()
        conn = await get(self)
        now = perf_counter()
        out[conn] = now
        append(now - start)
        return conn

    async def release_hook(self: Any, conn: Any) -> Any:
        start = out.pop(conn, None)
        if start is not None:
            append(perf_counter() - start)
        return await put(self, conn)

    async def acquire_frame(self: Any) -> Any:
        start = 0.0
        conn = await get(self)
        now = 1.0
        out[conn] = now
        append(now - start)
        return conn

    async def release_frame(self: Any, conn: Any) -> Any:
        start = out.pop(conn, None)
        if start is not None:
            append(2.0 - start)
        return await put(self, conn)

    return (acquire_hook, release_hook) if clocked else (acquire_frame, release_frame)


def floor_results(samples: Mapping[str, Sequence[float]]) -> dict[str, Summary]:
    """What the floor's variants add over bare, per round paired, when they were timed."""
    found = {}
    for variant in ("floor", "frames"):
        if variant in samples:
            found[f"{variant} added"] = summarize(
                paired_differences(samples[variant], samples["bare"])
            )
    return found


def clock_read_ns(rounds: int = 9, reads: int = 200_000) -> float:
    """The median over ``rounds`` of ns per ``perf_counter()`` read in a tight loop (the
    loop's own cost, timed with nothing in it, taken off)."""
    per_read = []
    for _ in range(rounds):
        start = perf_counter_ns()
        for _ in range(reads):
            perf_counter()
        read = perf_counter_ns() - start
        start = perf_counter_ns()
        for _ in range(reads):
            pass
        empty = perf_counter_ns() - start
        per_read.append((read - empty) / reads)
    return statistics.median(per_read)


def floor_lines(row: Mapping[str, Summary], added: float) -> list[str]:
    """The lines that follow a row timed with the floor too."""
    floor = row["floor added"].median
    lines = [
        f"  the floor's hooks (benchmarks/_floor.py: two frames, three clock reads, no "
        f"bookkeeping) add {floor:.2f} µs in the same rounds: poolwatch's own work above "
        f"the floor is {added - floor:.2f} µs"
    ]
    if "frames added" in row:
        frames = row["frames added"].median
        lines.append(
            f"  of the floor, its frames (the same hooks without their clock reads) add "
            f"{frames:.2f} µs and its three clock reads {floor - frames:.2f} µs "
            f"({(floor - frames) / 3 * 1000:.0f} ns a read, in situ)"
        )
    return lines


def clock_line(ns: float) -> str:
    """The line that gives a clock read's cost on this machine."""
    return (
        f"one perf_counter() read in a tight loop on this machine: {ns:.0f} ns "
        "(each wait and use a hook times takes three)"
    )
