"""Grafana dashboards: current, linted, and every query parsed by promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
FILES = ["poolwatch-overview.json", "poolwatch-pool.json"]
VARIABLES = ["datasource", "job", "instance", "kind", "pool"]


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return data


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def test_the_dashboards_are_rendered_from_code() -> None:
    result = subprocess.run(
        [sys.executable, str(DASHBOARDS / "build.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_titles_and_uids_are_pinned() -> None:
    assert [(_load(f)["uid"], _load(f)["title"]) for f in FILES] == [
        ("poolwatch-overview", "Connection pools / overview"),
        ("poolwatch-pool", "Connection pool / detail"),
    ]


@pytest.mark.parametrize("name", FILES)
def test_dashboard_lint(name: str) -> None:
    dashboard = _load(name)
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == VARIABLES
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in VARIABLES[1:]:
        assert variables[variable]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    windows = 0
    for panel in dashboard["panels"]:
        title = panel["title"]
        assert panel["description"].endswith("."), title
        assert panel["fieldConfig"]["defaults"]["unit"], title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
            expr = target["expr"]
            for window in re.findall(r"\b(?:rate|irate)\([^\[]*\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", f"{title}: {expr}"
                windows += 1
            assert 'pool_name=~"$pool"' in expr, f"{title} ignores the pool variable"


def test_every_query_parses(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package (scripts/test does)"
    rules = []
    for name in FILES:
        for index, (_title, expr) in enumerate(_targets(_load(name))):
            substituted = (
                expr.replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
                .replace("$job", ".*")
                .replace("$instance", ".*")
                .replace("$kind", ".*")
                .replace("$pool", ".*")
            )
            assert "$" not in substituted, substituted
            rules.append(
                {
                    "record": f"dashboard:{Path(name).stem.replace('-', '_')}:{index}",
                    "expr": substituted,
                }
            )
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
