"""Derived pool names are safe to show: printable, capped in length, still telling pools
apart; ``poolwatch top``'s table keeps one line per pool whatever a name holds."""

from __future__ import annotations

import re
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Gauge, generate_latest

import poolwatch
from poolwatch._naming import MAX_NAME
from poolwatch.cli import top as _top
from tests.support.harness import Harness


def _exported_names(pw: Harness) -> set[str]:
    points = pw.collect().points("poolwatch.connections")
    return {str(p.attributes["pool.name"]) for p in points}


def test_a_newline_in_a_target_is_escaped(pw: Harness, tmp_path: Path) -> None:
    path = tmp_path / "orders\nreplica\x1b[31m.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    engine.connect().close()
    escaped = f"sqlite:///{tmp_path}/orders\\nreplica\\x1b[31m.db"
    assert [p.name for p in poolwatch.pools()] == [escaped]
    assert _exported_names(pw) == {escaped}


def test_a_long_target_is_shortened_and_two_stay_two(pw: Harness, tmp_path: Path) -> None:
    deep = "/".join(["d" * 100] * 100)  # a 10,099-character path (never created)
    first = sa.create_engine(f"sqlite:///{tmp_path}/{deep}/a.db")
    second = sa.create_engine(f"sqlite:///{tmp_path}/{deep}/b.db")
    names = [p.name for p in poolwatch.pools()]
    assert len(names) == 2 and all(len(name) == MAX_NAME for name in names)
    tails = []
    for name in names:
        start, _digest, end = re.fullmatch(r"(.*)…([0-9a-f]{8})…(.*)", name).groups()  # type: ignore[union-attr]
        assert start == f"sqlite:///{tmp_path}/{deep}"[: len(start)]
        assert (len(start), len(end)) == (140, 50)
        tails.append(end[-5:])
    assert sorted(tails) == ["/a.db", "/b.db"]
    assert _exported_names(pw) == set(names)
    del first, second


def test_the_creation_site_survives_shortening(pw: Harness, tmp_path: Path) -> None:
    target = f"sqlite:///{tmp_path}/{'x' * 500}.db"
    first = sa.create_engine(target)
    second = sa.create_engine(target)  # a second place: its name needs the site
    names = [p.name for p in poolwatch.pools() if "xxx" in p.name]
    [plain] = [name for name in names if not name.endswith(")")]
    [sited] = [name for name in names if name.endswith(")")]
    assert (len(plain), len(sited)) == (MAX_NAME, MAX_NAME)
    assert re.fullmatch(r".*…[0-9a-f]{8}…x+\.db", plain)
    assert re.fullmatch(r".*…[0-9a-f]{8}…x+\.db \(tests/test_names\.py:\d+\)", sited)
    del first, second


def test_top_keeps_one_line_per_pool_whatever_the_name() -> None:
    """Names read from any endpoint (another poolwatch, a Collector) are shown escaped."""
    registry = CollectorRegistry()
    gauge = Gauge(
        "poolwatch_connections", "", ["pool_kind", "pool_name", "state"], registry=registry
    )
    gauge.labels("sqlalchemy", "orders\n\x1b[2Jreplica", "used").set(3)
    gauge.labels("sql\nalchemy", "billing", "used").set(1)
    pools = _top.parse(generate_latest(registry).decode())
    table = _top.render(_top.ordered(_top.rows(pools, None, seconds=0.0), "n"), colour=False)
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[1].split()[:2] == ["billing", "sql\\nalchemy"]
    assert lines[2].split()[:2] == ["orders\\n\\x1b[2Jreplica", "sqlalchemy"]
