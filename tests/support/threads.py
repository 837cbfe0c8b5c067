"""Which test threads are really blocked, read from their stacks (not from poolwatch)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

_DEPTH = 40


def blocked_in(
    threads: Sequence[threading.Thread], function: str, owner: object | None = None
) -> int:
    """How many of ``threads`` are blocked in ``threading.Condition.wait`` — registered
    as a waiter of the condition, their lock not yet released — called (at any depth)
    from a frame running ``function`` (e.g. urllib3's ``_get_conn``); with ``owner``, only
    a frame whose ``self`` is ``owner`` (one pool among several)."""
    frames = sys._current_frames()
    count = 0
    for thread in threads:
        top = frames.get(thread.ident) if thread.ident is not None else None
        if top is None or not _waiting(top):
            continue
        frame: FrameType | None = top
        depth = 0
        while frame is not None and depth < _DEPTH:
            if frame.f_code.co_name == function and (
                owner is None or frame.f_locals.get("self") is owner
            ):
                count += 1
                break
            frame, depth = frame.f_back, depth + 1
    return count


def _waiting(frame: FrameType) -> bool:
    if frame.f_code is not threading.Condition.wait.__code__:
        return False
    local = frame.f_locals
    waiter, condition = local.get("waiter"), local.get("self")
    waiters = getattr(condition, "_waiters", ())
    return waiter is not None and waiter in waiters and waiter.locked()


def wait_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Poll ``condition`` every 5 ms until it holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Yield to the event loop every 5 ms until ``condition`` holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)
