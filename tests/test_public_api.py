"""The public API is a contract: these names, and nothing else, are exported."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import types

import pytest

import poolwatch


def test_exported_names_are_pinned() -> None:
    assert poolwatch.__all__ == [
        "Antipattern",
        "ConfigError",
        "Instrumentation",
        "PoolSnapshot",
        "ProcessConnections",
        "ProcessView",
        "Sizing",
        "__version__",
        "instrument",
        "pools",
        "process_view",
        "track",
        "uninstrument",
    ]
    for name in poolwatch.__all__:  # the functions load on first use: use them all
        getattr(poolwatch, name)
    public = {
        name
        for name, value in vars(poolwatch).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(poolwatch.__all__) - {"__version__"}
    assert set(dir(poolwatch)) >= set(poolwatch.__all__)
    with pytest.raises(AttributeError, match="no attribute 'instrumentt'"):
        poolwatch.instrumentt  # type: ignore[attr-defined]  # noqa: B018


def test_the_command_line_loads_no_opentelemetry_sdk() -> None:
    """``poolwatch top --help`` (and ``doctor``'s) imports neither OpenTelemetry's SDK nor
    the demo: the command reads a process's metrics over HTTP and needs neither."""
    code = (
        "import sys\n"
        "from poolwatch.cli import main\n"
        "for command in ('top', 'doctor', 'run'):\n"
        "    try:\n"
        "        main([command, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "prefixes = ('opentelemetry', 'poolwatch._')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(prefixes))\n"
        "print(' '.join(loaded), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = done.stderr.split()
    assert [m for m in loaded if m.startswith("opentelemetry")] == []
    assert "poolwatch._api" not in loaded and "poolwatch._demo.workload" not in loaded


def test_signatures_are_pinned() -> None:
    assert (
        str(inspect.signature(poolwatch.instrument)) == "(**settings: 'Any') -> 'Instrumentation'"
    )
    assert str(inspect.signature(poolwatch.uninstrument)) == "() -> 'None'"
    assert (
        str(inspect.signature(poolwatch.track))
        == "(obj: 'Any', *, name: 'str | None' = None) -> 'None'"
    )
    assert str(inspect.signature(poolwatch.pools)) == "() -> 'list[PoolSnapshot]'"
    assert str(inspect.signature(poolwatch.process_view)) == "() -> 'ProcessView | None'"


def test_snapshot_and_finding_fields_are_pinned() -> None:
    fields = [f.name for f in dataclasses.fields(poolwatch.PoolSnapshot)]
    assert fields == [
        "name",
        "kind",
        "used",
        "idle",
        "max",
        "pending",
        "instances",
        "instances_created",
        "checkouts",
        "timeouts",
        "connects",
        "connect_errors",
        "closed",
        "leaks",
        "leaks_active",
        "wait_p99",
        "attributes",
        "idle_max",
        "reused",
        "antipatterns",
        "sizing",
    ]
    assert [f.name for f in dataclasses.fields(poolwatch.Antipattern)] == [
        "name",
        "problem",
        "advice",
        "active",
    ]
    assert [f.name for f in dataclasses.fields(poolwatch.Sizing)] == ["size", "reasoning"]
    assert [f.name for f in dataclasses.fields(poolwatch.ProcessView)] == [
        "pid",
        "file_descriptors",
        "file_descriptors_max",
        "connections",
        "taken_at",
    ]
    assert [f.name for f in dataclasses.fields(poolwatch.ProcessConnections)] == [
        "state",
        "owner",
        "count",
        "address",
        "port",
    ]


def test_process_view_is_none_when_not_instrumented() -> None:
    poolwatch.uninstrument()
    assert poolwatch.process_view() is None


def test_version_is_a_release_string() -> None:
    parts = poolwatch.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(poolwatch.ConfigError, ValueError)


def test_pools_is_empty_when_not_instrumented() -> None:
    poolwatch.uninstrument()
    assert poolwatch.pools() == []


def test_track_before_instrument_says_what_to_do() -> None:
    poolwatch.uninstrument()
    try:
        poolwatch.track(object())
    except RuntimeError as error:
        assert str(error) == "poolwatch.track() needs poolwatch.instrument() to be called first"
    else:  # pragma: no cover - the assertion above is the test
        raise AssertionError("track() before instrument() must raise")


def test_a_snapshot_tells_the_pool_state_in_one_line(
    sample_snapshot: poolwatch.PoolSnapshot,
) -> None:
    snap = sample_snapshot
    assert repr(snap) == (
        "<PoolSnapshot sqlalchemy 'postgresql://db:5432/orders' [used 8, idle 2, max 10, "
        "pending 3 | checkouts 1200, timeouts 4]>"
    )
    assert snap.utilization == 0.8
    unbounded = dataclasses.replace(snap, max=None)
    assert "max unbounded" in repr(unbounded)
    assert unbounded.utilization is None
