"""poolwatch's hooks are indistinguishable from the functions they replace.

To callers: every documented argument of SQLAlchemy's engine factories behaves exactly as
without poolwatch (they read ``Engine.__init__``'s parameter names to sort keyword
arguments). To introspection: ``inspect.signature`` and the code-object parameters of every
patched callable, and of the classes whose constructors are patched, are the library's.
And a hook survives being removed while it runs.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import poolwatch
from poolwatch import _api
from poolwatch.adapters._patching import (
    Parameters,
    SignatureMismatch,
    around,
    disguise,
    function_of,
)
from tests.support.harness import Harness

# -- the mechanism ---------------------------------------------------------------------------


def _shapes() -> list[Callable[..., Any]]:
    def plain(self, a, b=1, *args, c, d=2, **kwargs):  # type: ignore[no-untyped-def]
        return (self, a, b, args, c, d, kwargs)

    def positional_only(a, b, /, c=3):  # type: ignore[no-untyped-def]
        return (a, b, c)

    def keyword_only(*, x: int = 5, y: str) -> tuple[int, str]:
        return (x, y)

    async def asynchronous(self: object, request: object, timeout: float | None = None) -> Any:
        return (self, request, timeout)

    shapes: list[Callable[..., Any]] = [plain, positional_only, keyword_only, asynchronous]
    shapes.append(lambda rec, _hook=None: (rec, _hook))  # a lambda; a parameter named _hook
    return shapes


def _call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = function(*args, **kwargs)
    if inspect.iscoroutine(result):
        return asyncio.run(result)
    return result


@pytest.mark.parametrize("original", _shapes(), ids=lambda f: f.__name__)
def test_around_mirrors_every_parameter_shape(original: Callable[..., Any]) -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        return original(*args, **kwargs)

    made = around(original, hook)
    assert Parameters.of(made) == Parameters.of(function_of(original))
    assert inspect.signature(made, follow_wrapped=False) == inspect.signature(original)
    assert inspect.iscoroutinefunction(made) == inspect.iscoroutinefunction(original)
    for name in ("__name__", "__qualname__", "__module__", "__doc__", "__defaults__"):
        assert getattr(made, name) == getattr(original, name)
    assert made.__kwdefaults__ == original.__kwdefaults__
    assert made.__wrapped__ is original  # type: ignore[attr-defined]
    calls = {
        "plain": ((0, 1), {"c": 3, "z": 9}),
        "positional_only": ((1, 2), {}),
        "keyword_only": ((), {"y": "why"}),
        "asynchronous": (("s", "r"), {"timeout": 1.5}),
        "<lambda>": (("rec",), {}),
    }
    args, kwargs = calls[original.__name__]
    assert _call(made, *args, **kwargs) == _call(original, *args, **kwargs)
    assert len(seen) == 1


def test_around_passes_a_default_as_the_same_object() -> None:
    sentinel = object()

    def original(a: object = sentinel) -> bool:
        return a is sentinel

    assert around(original, original)() is True


def test_disguise_refuses_a_hook_whose_parameters_differ() -> None:
    def original(self: object, timeout: float | None = None) -> None: ...

    def renamed(self: object, wait: float | None = None) -> None: ...

    def extra(self: object, timeout: float | None = None, *args: object) -> None: ...

    for hook in (renamed, extra):
        with pytest.raises(SignatureMismatch, match="original"):
            disguise(hook, original)


def test_disguise_dresses_a_matching_hook_as_the_original() -> None:
    def original(self: object, timeout: float | None = 3.0) -> int:
        """The library's docstring."""
        return 1

    def hook(self, timeout=None):  # type: ignore[no-untyped-def]
        return 2

    dressed = disguise(hook, original)
    assert dressed is hook
    assert inspect.signature(hook, follow_wrapped=False) == inspect.signature(original)
    assert (hook.__name__, hook.__defaults__) == ("original", (3.0,))
    assert hook.__doc__ == original.__doc__


# -- every callable poolwatch replaces --------------------------------------------------------


def _import_every_library() -> None:
    import aiohttp  # noqa: F401
    import asyncpg  # noqa: F401
    import botocore.httpsession  # noqa: F401
    import httpx  # noqa: F401
    import psycopg_pool  # noqa: F401
    import redis.asyncio  # noqa: F401
    import requests  # noqa: F401
    import sqlalchemy  # noqa: F401
    import urllib3  # noqa: F401


def _patched_functions() -> list[tuple[type, str, Any, Any]]:
    """(owner, attribute, original, replacement) of every function poolwatch replaced."""
    current = _api._current
    assert current is not None
    found = []
    for adapter in current._active.values():
        for owner, attribute, original in adapter._patches:
            if isinstance(original, (staticmethod, classmethod)) or inspect.isfunction(original):
                found.append((owner, attribute, original, owner.__dict__[attribute]))
    return found


def _constructed_classes() -> list[type]:
    import aiohttp
    import asyncpg
    import httpx
    import psycopg_pool
    import redis
    import redis.asyncio
    import urllib3
    from sqlalchemy.engine.base import Engine

    return [
        Engine,
        urllib3.HTTPConnectionPool,
        urllib3.HTTPSConnectionPool,
        urllib3.PoolManager,
        urllib3.ProxyManager,
        httpx.Client,
        httpx.AsyncClient,
        aiohttp.ClientSession,
        aiohttp.TCPConnector,
        redis.ConnectionPool,
        redis.BlockingConnectionPool,
        redis.asyncio.ConnectionPool,
        redis.asyncio.BlockingConnectionPool,
        psycopg_pool.ConnectionPool,
        psycopg_pool.AsyncConnectionPool,
        psycopg_pool.NullConnectionPool,
        psycopg_pool.AsyncNullConnectionPool,
        asyncpg.Pool,
    ]


def test_every_patched_callable_keeps_the_librarys_signature_and_code_parameters(
    harness: Harness,
) -> None:
    _import_every_library()
    classes = _constructed_classes()
    before = {cls: inspect.signature(cls) for cls in classes}
    handle = harness.instrument()
    assert sorted(handle.libraries) == [
        "aiohttp",
        "asyncpg",
        "httpx",
        "psycopg_pool",
        "redis",
        "sqlalchemy",
        "urllib3",
    ]
    patched = _patched_functions()
    assert len(patched) >= 30  # every adapter's hooks: a check that the list is not empty
    for owner, attribute, original, replacement in patched:
        where = f"{owner.__qualname__}.{attribute}"
        assert type(replacement) is type(original), where  # classmethod stays classmethod
        old, new = function_of(original), function_of(replacement)
        assert new is not old, where
        assert Parameters.of(new) == Parameters.of(old), where
        assert inspect.signature(new) == inspect.signature(old), where
        # Not following __wrapped__ either: the library's own function may itself be a
        # decorator's wrapper (redis-py's get_connection is @deprecated_args' (*args,
        # **kwargs) wrapper), and the hook then takes what that wrapper takes.
        assert inspect.signature(new, follow_wrapped=False) == inspect.signature(
            old, follow_wrapped=False
        ), where
        for name in ("__name__", "__qualname__", "__module__", "__doc__", "__annotations__"):
            assert getattr(new, name) == getattr(old, name), f"{where}: {name}"
        assert new.__wrapped__ is old, where
    assert {cls: inspect.signature(cls) for cls in classes} == before
    handle.uninstrument()
    for owner, attribute, original, _ in patched:
        assert owner.__dict__.get(attribute) is original, f"{owner.__qualname__}.{attribute}"


def test_sqlalchemy_still_sorts_engine_arguments_by_engine_init_parameters(
    harness: Harness,
) -> None:
    from sqlalchemy import util
    from sqlalchemy.engine.base import Engine

    bare = util.get_cls_kwargs(Engine)
    harness.instrument()
    assert util.get_cls_kwargs(Engine) == bare
    assert {"echo", "logging_name", "hide_parameters", "query_cache_size"} <= bare


# -- every documented argument of SQLAlchemy's engine factories -------------------------------


def _engine_fingerprint(engine: Any, records: list[str]) -> dict[str, Any]:
    """What an engine made of its arguments, and what it does with them (a query run)."""
    from sqlalchemy import text

    pool = engine.pool
    dialect = engine.dialect
    seen: dict[str, Any] = {}
    for name, obj, attribute in [
        ("engine.echo", engine, "echo"),
        ("engine.logging_name", engine, "logging_name"),
        ("engine.hide_parameters", engine, "hide_parameters"),
        ("engine.execution_options", engine, "_execution_options"),
        ("engine.cache_capacity", getattr(engine, "_compiled_cache", None), "capacity"),
        ("pool.class", pool, "__class__"),
        ("pool.echo", pool, "echo"),
        ("pool.logging_name", pool, "_orig_logging_name"),
        ("pool.size", pool, "_pool.maxsize"),
        ("pool.max_overflow", pool, "_max_overflow"),
        ("pool.timeout", pool, "_timeout"),
        ("pool.recycle", pool, "_recycle"),
        ("pool.pre_ping", pool, "_pre_ping"),
        ("pool.use_lifo", pool, "_pool.use_lifo"),
        ("pool.reset_on_return", pool, "_reset_on_return"),
        ("dialect.paramstyle", dialect, "paramstyle"),
        ("dialect.label_length", dialect, "label_length"),
        ("dialect.max_identifier_length", dialect, "max_identifier_length"),
        ("dialect.insertmanyvalues_page_size", dialect, "insertmanyvalues_page_size"),
        ("dialect.use_insertmanyvalues", dialect, "use_insertmanyvalues"),
        ("dialect.isolation_level", dialect, "isolation_level"),
        ("dialect.implicit_returning", dialect, "implicit_returning"),
        ("dialect.enable_from_linting", dialect, "compiler_linting"),
        ("dialect.json_serializer", dialect, "_json_serializer"),
    ]:
        value: Any = obj
        for part in attribute.split("."):
            value = getattr(value, part, "<absent>")
        seen[name] = value
    with engine.connect() as connection:
        seen["result"] = connection.execute(text("SELECT :x + 1"), {"x": 41}).scalar()
        seen["isolation"] = connection.get_isolation_level()
    # What echo logged: the same lines, timings and addresses aside.
    seen["log"] = [re.sub(r"0x[0-9a-f]+|[\d.]+s\b", "#", line) for line in records]
    records.clear()
    engine.dispose()
    return seen


def _outcome(make: Callable[[], Any], records: list[str]) -> Any:
    try:
        engine = make()
    except Exception as error:
        return ("raised", type(error).__name__, str(error))
    return _engine_fingerprint(engine, records)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")


@pytest.fixture
def engine_logs() -> Iterator[list[str]]:
    handler = _Lines()
    logger = logging.getLogger("sqlalchemy")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        for name in list(logging.root.manager.loggerDict):  # echo sets levels on its loggers
            if name.startswith("sqlalchemy"):
                logging.getLogger(name).setLevel(logging.NOTSET)


def _engine_cases(path: Path) -> list[tuple[str, Callable[[], Any]]]:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool, QueuePool

    url = f"sqlite:///{path}"
    cases: dict[str, dict[str, Any]] = {
        "echo": {"echo": True},
        "echo debug": {"echo": "debug"},
        "echo_pool": {"echo_pool": "debug"},
        "logging_name": {"logging_name": "orders", "echo": True},
        "hide_parameters": {"hide_parameters": True, "echo": True},
        "query_cache_size": {"query_cache_size": 7},
        "execution_options": {"execution_options": {"isolation_level": "SERIALIZABLE"}},
        "isolation_level": {"isolation_level": "READ UNCOMMITTED"},
        "connect_args": {"connect_args": {"timeout": 3}},
        "creator": {"creator": lambda: sqlite3.connect(path)},
        "module": {"module": sqlite3},
        "enable_from_linting": {"enable_from_linting": False},
        "implicit_returning": {"implicit_returning": True},
        "insertmanyvalues": {"insertmanyvalues_page_size": 9, "use_insertmanyvalues": False},
        "json": {"json_serializer": json.dumps, "json_deserializer": json.loads},
        "label_length": {"label_length": 20},
        "max_identifier_length": {"max_identifier_length": 99},
        "paramstyle": {"paramstyle": "named"},
        "plugins": {"plugins": []},
        "future": {"future": True},
        "queue pool": {
            "poolclass": QueuePool,
            "pool_size": 3,
            "max_overflow": 2,
            "pool_timeout": 4,
            "pool_recycle": 60,
            "pool_pre_ping": True,
            "pool_use_lifo": True,
            "pool_reset_on_return": "commit",
            "pool_logging_name": "orders-pool",
        },
        "null pool": {"poolclass": NullPool},
        "an unknown argument": {"no_such_argument": 1},
        "convert_unicode (removed)": {"convert_unicode": True},
    }
    made: list[tuple[str, Callable[[], Any]]] = [
        (name, lambda kwargs=kwargs: sa.create_engine(url, **kwargs))
        for name, kwargs in cases.items()
    ]
    made.append(
        (
            "engine_from_config",
            lambda: sa.engine_from_config(
                {
                    "db.url": url,
                    "db.echo": "true",
                    "db.pool_size": "4",
                    "db.logging_name": "cfg",
                },
                prefix="db.",
            ),
        )
    )
    return made


def test_every_create_engine_argument_behaves_as_without_poolwatch(
    harness: Harness, tmp_path: Path, engine_logs: list[str]
) -> None:
    cases = _engine_cases(tmp_path / "app.db")
    bare = {name: _outcome(make, engine_logs) for name, make in cases}
    assert bare["echo"]["log"], "echo=True logged nothing: the comparison would be empty"
    assert bare["an unknown argument"][0] == "raised"
    handle = harness.instrument()
    instrumented = {name: _outcome(make, engine_logs) for name, make in cases}
    for name, outcome in bare.items():
        assert instrumented[name] == outcome, name
    snapshots = {s.name for s in handle.pools()}
    assert f"sqlite:///{tmp_path / 'app.db'}" in snapshots  # and every engine was hooked
    assert handle.errors == {}


def test_create_pool_from_url_and_create_async_engine_behave_as_without_poolwatch(
    harness: Harness, tmp_path: Path, engine_logs: list[str]
) -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    path = tmp_path / "app.db"

    def pool_of() -> tuple[Any, ...]:
        pool = sa.create_pool_from_url(
            f"sqlite:///{path}", timeout=3, pool_size=2, logging_name="p", echo=True, pre_ping=True
        )
        connection = pool.connect()
        connection.close()
        return (type(pool), pool._timeout, pool.size(), pool._orig_logging_name, pool._pre_ping)

    async def run_async() -> tuple[Any, ...]:
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{path}",
            echo=True,
            logging_name="async",
            hide_parameters=True,
            execution_options={"isolation_level": "SERIALIZABLE"},
            pool_size=2,
        )
        async with engine.connect() as connection:
            value = (await connection.execute(sa.text("SELECT :x"), {"x": 5})).scalar()
        await engine.dispose()
        return (value, engine.sync_engine.logging_name, engine.sync_engine.hide_parameters)

    bare = (pool_of(), asyncio.run(run_async()))
    bare_log = [re.sub(r"0x[0-9a-f]+|[\d.]+s\b", "#", line) for line in engine_logs]
    engine_logs.clear()
    handle = harness.instrument()
    assert (pool_of(), asyncio.run(run_async())) == bare
    assert [re.sub(r"0x[0-9a-f]+|[\d.]+s\b", "#", line) for line in engine_logs] == bare_log
    assert handle.errors == {}


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_instrumented_before_sqlalchemy_is_imported_echo_works() -> None:
    result = _run(
        "import poolwatch; poolwatch.instrument(process_view='off')\n"
        "import sqlalchemy as sa\n"
        "engine = sa.create_engine('sqlite://', echo=True, logging_name='first')\n"
        "with engine.connect() as c: print(c.exec_driver_sql('SELECT 7').scalar())\n"
        "print([p.name for p in poolwatch.pools()])\n"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line for line in lines if "sqlalchemy" not in line] == ["7", "['sqlite://:memory:']"]
    assert any(line.endswith("sqlalchemy.engine.Engine.first SELECT 7") for line in lines)


def test_flask_sqlalchemy_init_app_works_under_poolwatch(harness: Harness) -> None:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy import text

    handle = harness.instrument()
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "sqlite://"
    app.config["SQLALCHEMY_ECHO"] = True  # Flask-SQLAlchemy always passes echo
    db = SQLAlchemy()
    db.init_app(app)
    with app.app_context():
        assert db.session.execute(text("SELECT 3")).scalar() == 3
        assert db.engine.echo is True
    [snapshot] = handle.pools()
    assert (snapshot.kind, snapshot.name) == ("sqlalchemy", "sqlite://:memory:")
    assert snapshot.checkouts == 1


# -- a hook removed while it runs ---------------------------------------------------------


def _waiting(thread: threading.Thread, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert thread.is_alive() and time.monotonic() < deadline, "the waiter never waited"
        time.sleep(0.005)


def test_a_sqlalchemy_checkout_waiting_while_uninstrument_runs_completes(
    harness: Harness, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    harness.instrument()
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'w.db'}", pool_size=1, max_overflow=0)
    held = engine.connect()
    outcome: list[object] = []

    def wait() -> None:
        try:
            with engine.connect() as connection:
                outcome.append(connection.exec_driver_sql("SELECT 1").scalar())
        except BaseException as error:  # what the application would see
            outcome.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    _waiting(waiter, lambda: engine.pool._pool.not_empty._waiters)
    poolwatch.uninstrument()
    held.close()
    waiter.join(10)
    assert outcome == [1]
    engine.dispose()


def test_an_httpx_request_waiting_while_uninstrument_runs_completes(harness: Harness) -> None:
    import httpx

    from tests.support.upstream import ThreadedUpstream

    with ThreadedUpstream() as upstream:
        harness.instrument()
        client = httpx.Client(limits=httpx.Limits(max_connections=1))
        outcome: list[object] = []
        held = client.send(client.build_request("GET", upstream.url), stream=True)

        def wait() -> None:
            try:
                outcome.append(client.get(upstream.url).status_code)
            except BaseException as error:
                outcome.append(error)

        waiter = threading.Thread(target=wait)
        waiter.start()
        pool = client._transport._pool
        _waiting(waiter, lambda: any(r.connection is None for r in list(pool._requests)))
        poolwatch.uninstrument()
        held.close()
        waiter.join(10)
        client.close()
    assert outcome == [200]


def test_an_async_httpx_request_waiting_while_uninstrument_runs_completes(
    harness: Harness,
) -> None:
    import httpx

    from tests.support.upstream import ThreadedUpstream

    async def scenario(url: str) -> list[object]:
        harness.instrument()
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=1))
        held = await client.send(client.build_request("GET", url), stream=True)
        waiter = asyncio.ensure_future(client.get(url))
        pool = client._transport._pool
        while not any(r.connection is None for r in list(pool._requests)):
            await asyncio.sleep(0.005)
        poolwatch.uninstrument()
        await held.aclose()
        response = await asyncio.wait_for(waiter, 10)
        await client.aclose()
        return [response.status_code]

    with ThreadedUpstream() as upstream:
        assert asyncio.run(scenario(upstream.url)) == [200]


def test_a_redis_checkout_waiting_while_uninstrument_runs_completes(
    harness: Harness, redis_server: Any
) -> None:
    import redis

    harness.instrument()
    pool = redis.BlockingConnectionPool.from_url(redis_server.url(40), max_connections=1)
    client = redis.Redis(connection_pool=pool)
    held = pool.get_connection()
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(client.ping())
        except BaseException as error:  # what the application would see
            outcome.append(error)

    waiter = threading.Thread(target=wait)
    waiter.start()
    _waiting(waiter, lambda: pool.pool.not_empty._waiters)
    poolwatch.uninstrument()
    pool.release(held)
    waiter.join(10)
    assert outcome == [True]
    pool.disconnect()


def test_an_asyncio_redis_checkout_waiting_while_uninstrument_runs_completes(
    harness: Harness, redis_server: Any
) -> None:
    import redis.asyncio as aredis

    async def scenario() -> list[object]:
        harness.instrument()
        pool = aredis.BlockingConnectionPool.from_url(redis_server.url(41), max_connections=1)
        client = aredis.Redis(connection_pool=pool)
        held = await pool.get_connection()
        waiter = asyncio.ensure_future(client.ping())
        while not pool._condition._waiters:
            await asyncio.sleep(0.005)
        poolwatch.uninstrument()
        await pool.release(held)
        answer = await asyncio.wait_for(waiter, 10)
        await pool.disconnect()
        return [answer]

    assert asyncio.run(scenario()) == [True]
