"""One adapter per library, all behind :class:`~poolwatch.adapters._base.Adapter`.

Adding a library means adding one module here and one entry to :data:`ADAPTERS`.
"""

from __future__ import annotations

from poolwatch._models import HostLevels, Levels, Misconfiguration
from poolwatch.adapters._base import Adapter, Tracker
from poolwatch.adapters.aiohttp import AiohttpAdapter
from poolwatch.adapters.asyncpg import AsyncpgAdapter
from poolwatch.adapters.httpx import HTTPXAdapter
from poolwatch.adapters.psycopg_pool import PsycopgPoolAdapter
from poolwatch.adapters.redis import RedisAdapter
from poolwatch.adapters.sqlalchemy import SQLAlchemyAdapter
from poolwatch.adapters.urllib3 import Urllib3Adapter

ADAPTERS: dict[str, type[Adapter]] = {
    AiohttpAdapter.name: AiohttpAdapter,
    AsyncpgAdapter.name: AsyncpgAdapter,
    HTTPXAdapter.name: HTTPXAdapter,
    PsycopgPoolAdapter.name: PsycopgPoolAdapter,
    RedisAdapter.name: RedisAdapter,
    SQLAlchemyAdapter.name: SQLAlchemyAdapter,
    Urllib3Adapter.name: Urllib3Adapter,
}
"""Every adapter poolwatch has, by library name (the values of the ``libraries`` setting)."""

__all__ = ["ADAPTERS", "Adapter", "HostLevels", "Levels", "Misconfiguration", "Tracker"]
