"""Workloads more than one test file runs, against different drivers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

import poolwatch


async def exhaust_async_pool(
    engine: Any, snapshot: Callable[[], poolwatch.PoolSnapshot], waiters: int = 2
) -> tuple[poolwatch.PoolSnapshot, list[str]]:
    """Hold the only connection of ``engine`` (pool_size=1, no overflow) while ``waiters``
    tasks queue for it on a real event loop; return the pool as seen while they all wait,
    and each waiter's outcome ("acquired" or "timeout")."""
    held = await engine.connect()

    async def wait_for_connection() -> str:
        try:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except exc.TimeoutError:
            return "timeout"
        return "acquired"

    tasks = [asyncio.create_task(wait_for_connection()) for _ in range(waiters)]
    for _ in range(100):  # until every waiter is queued on the pool (bounded: 1 s)
        await asyncio.sleep(0.01)
        if snapshot().pending == waiters:
            break
    during = snapshot()
    outcomes = list(await asyncio.gather(*tasks))
    await held.close()
    return during, outcomes
