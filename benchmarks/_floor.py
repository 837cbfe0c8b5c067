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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any


class Timed(list[float]):
    """The durations the floor's hooks recorded (none for another variant)."""

    def __init__(self, label: str, floor: bool) -> None:
        super().__init__()
        self.label, self.floor = label, floor

    def check(self, ops: int) -> None:
        """Every acquire and release of ``ops`` was timed (by the floor's hooks alone)."""
        wanted = 2 * ops if self.floor else 0
        if len(self) != wanted:
            raise RuntimeError(f"{self.label}: {len(self)} durations for {ops} acquire+release")


@contextmanager
def floor_hooks(variant: str, cls: type, acquire: str, release: str) -> Iterator[Timed]:
    """For variant ``floor``: ``cls.acquire``/``cls.release`` (functions of the class
    itself, the acquire called with ``self`` alone) replaced by the floor's pair while the
    block runs. Yields what the pair recorded; for any other variant, nothing is replaced."""
    timed = Timed(f"{cls.__name__} {variant}", variant == "floor")
    if not timed.floor:
        yield timed
        return
    get: Callable[..., Any] = cls.__dict__[acquire]
    put: Callable[..., Any] = cls.__dict__[release]
    out: dict[Any, float] = {}
    append = timed.append

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

    setattr(cls, acquire, acquire_hook)
    setattr(cls, release, release_hook)
    try:
        yield timed
    finally:
        setattr(cls, acquire, get)
        setattr(cls, release, put)


def floor_line(floor: float, added: float) -> str:
    """The line that follows a row timed with the floor too."""
    return (
        f"  the floor's hooks (benchmarks/_floor.py: two frames, three clock reads, no "
        f"bookkeeping) add {floor:.2f} µs in the same rounds: poolwatch's own work above "
        f"the floor is {added - floor:.2f} µs"
    )
