"""Leaks: one WARNING naming the pool and, once captured, the borrower's stack; INFO on return."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import urllib3

import poolwatch
from tests.conftest import Harness
from tests.support.upstream import ThreadedUpstream

THRESHOLD = 0.05


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    found = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "poolwatch"]
    caplog.clear()
    return found


def _borrow(engine: sa.Engine) -> tuple[sa.Connection, int]:
    line = sys._getframe().f_lineno + 1
    return engine.connect(), line  # the borrower: this line must appear in the stack


def test_first_leak_is_reported_then_the_next_borrower_is_named(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness.instrument(leak_threshold=THRESHOLD)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/leak.db")
    poolwatch.track(engine, name="orders-db")
    caplog.set_level(logging.INFO, logger="poolwatch")
    first = engine.connect()
    time.sleep(THRESHOLD * 2)
    poolwatch.pools()  # a collection finds it
    [(level, message)] = _records(caplog)
    assert level == "WARNING"
    assert message.startswith(
        "poolwatch: a connection of pool 'orders-db' (sqlalchemy) has been checked out for "
    )
    assert message.endswith(
        "past the leak threshold of 0.05 s; the borrower's stack was not captured; it is from "
        "now on for this pool's checkouts (leak_stacks='auto')"
    )
    second, line = _borrow(engine)
    time.sleep(THRESHOLD * 2)
    poolwatch.pools()
    [(level, message)] = _records(caplog)
    assert level == "WARNING"
    assert "checked out at:\n" in message
    assert f'File "{__file__}", line {line}, in _borrow\n' in message
    innermost = message.split("checked out at:")[1].splitlines()[-1]
    package = str(Path(poolwatch.__file__).parent)
    assert innermost.startswith('  File "') and package not in innermost  # ours left out
    first.close()
    second.close()
    assert [level for level, _ in _records(caplog)] == []  # logged at the next collection
    poolwatch.pools()
    returned = _records(caplog)
    assert [level for level, _ in returned] == ["INFO", "INFO"]
    assert all(
        m.startswith("poolwatch: the leaked connection of pool 'orders-db' (sqlalchemy) came "
                     "back after ")
        for _, m in returned
    )  # fmt: skip
    [snap] = poolwatch.pools()
    assert (snap.leaks, snap.leaks_active) == (2, 0)
    assert [level for level, _ in _records(caplog)] == []  # each reported once


def test_a_leak_shorter_than_a_collection_is_counted_at_its_return(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="always")
    engine = sa.create_engine(f"sqlite:///{tmp_path}/leak.db")
    caplog.set_level(logging.INFO, logger="poolwatch")
    conn, line = _borrow(engine)
    time.sleep(THRESHOLD * 2)
    conn.close()  # back before any collection saw it out
    poolwatch.pools()
    [(level, message)] = _records(caplog)
    assert level == "WARNING"
    assert " was held for " in message
    assert f"line {line}, in _borrow" in message
    assert poolwatch.pools()[0].leaks == 1


def test_stacks_off(harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="off")
    engine = sa.create_engine(f"sqlite:///{tmp_path}/leak.db")
    caplog.set_level(logging.WARNING, logger="poolwatch")
    held: list[Any] = []
    for _ in range(2):
        held.append(engine.connect())
        time.sleep(THRESHOLD * 2)
        poolwatch.pools()
    messages = [m for _, m in _records(caplog)]
    assert len(messages) == 2
    assert all(
        m.endswith("the borrower's stack is not captured (leak_stacks='off')") for m in messages
    )
    for conn in held:
        conn.close()


def test_an_http_connection_held_too_long_names_its_borrower(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.instrument(leak_threshold=THRESHOLD, leak_stacks="always")
    caplog.set_level(logging.WARNING, logger="poolwatch")
    with ThreadedUpstream() as upstream:
        manager = urllib3.PoolManager()
        line = sys._getframe().f_lineno + 1
        response = manager.request("GET", upstream.url, preload_content=False)
        time.sleep(THRESHOLD * 2)
        poolwatch.pools()
        [(_, message)] = _records(caplog)
        assert message.startswith(f"poolwatch: a connection of pool '{upstream.origin}' (urllib3)")
        assert f'File "{__file__}", line {line}, in ' in message
        response.read()
        response.release_conn()
        manager.clear()
