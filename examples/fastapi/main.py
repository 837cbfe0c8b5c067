"""FastAPI: instrument in the lifespan handler; an async SQLAlchemy engine on SQLite.

Run it (from this directory, with poolwatch, fastapi, uvicorn, sqlalchemy and aiosqlite
installed):

    uvicorn main:app --host 127.0.0.1 --port 8000
    curl -X POST 127.0.0.1:8000/orders ; curl 127.0.0.1:8000/health/pools

Why the lifespan handler: it runs once in every process that serves the app — after
uvicorn's ``--workers`` have been started, and not in ``--reload``'s supervisor — and on the
event loop the app's async pools will use. The engine is created there too, after
``instrument()`` (so its creation site is this file), and disposed at shutdown.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import poolwatch

DATABASE_URL = os.environ.get("DATABASE_URL", "sqlite+aiosqlite:///./fastapi-example.db")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Settings come from the environment (OTEL_EXPORTER_OTLP_ENDPOINT, POOLWATCH_*); with
    # several uvicorn workers give each its own exporter identity (OTLP does), not one port.
    poolwatch.instrument()
    engine = create_async_engine(DATABASE_URL)
    async with engine.begin() as conn:  # one checkout at start-up: the schema
        await conn.execute(
            sa.text("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
        )
    app.state.engine = engine
    try:
        yield
    finally:
        await engine.dispose()
        poolwatch.uninstrument()  # flushes poolwatch's own exporters one last time


app = FastAPI(lifespan=lifespan)


def _engine(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.engine
    return engine


@app.post("/orders")
async def create_order(request: Request) -> dict[str, int]:
    async with _engine(request).begin() as conn:  # one checkout per request
        result = await conn.execute(sa.text("INSERT INTO orders (item) VALUES ('widget')"))
        return {"id": int(result.lastrowid or 0)}


@app.get("/health/pools")
async def health_pools() -> list[dict[str, Any]]:
    return [dataclasses.asdict(pool) for pool in poolwatch.pools()]
