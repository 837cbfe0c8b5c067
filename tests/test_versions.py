"""Supported versions as data: the comparison, each adapter's ranges, and the gate.

A version outside an adapter's range is made real the way Python finds versions: a
directory holding ``<Name>-<version>.dist-info/METADATA`` put first on ``sys.path``, which
``importlib.metadata`` reads before the installed distribution's own.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

import poolwatch
from poolwatch import _versions
from poolwatch._versions import Version, parse_requirement, parse_version
from poolwatch.adapters import ADAPTERS
from tests.support.harness import Harness

REPO = Path(__file__).resolve().parent.parent


def fake_distribution(root: Path, name: str, version: str) -> Path:
    """Write ``<name>-<version>.dist-info/METADATA`` under ``root``; return ``root``."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


@pytest.fixture
def installed_as(tmp_path: Path) -> Iterator[object]:
    """``installed_as("SQLAlchemy", "1.4.54")``: importlib.metadata reports that version."""
    added: list[str] = []

    def install(name: str, version: str) -> None:
        where = str(fake_distribution(tmp_path / f"{name}-{version}", name, version))
        sys.path.insert(0, where)
        added.append(where)

    yield install
    for where in added:
        sys.path.remove(where)


# -- the comparison -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.0.0", Version(0, (2,), True)),
        ("2.0", Version(0, (2,), True)),
        ("2.1.9", Version(0, (2, 1, 9), True)),
        ("1.44.18", Version(0, (1, 44, 18), True)),
        ("2.2.0rc1", Version(0, (2, 2), False)),
        ("2.2.0b3", Version(0, (2, 2), False)),
        ("2.2.0.dev4", Version(0, (2, 2), False)),
        ("2.2.0a1.dev2", Version(0, (2, 2), False)),
        ("2.0.5.post1", Version(0, (2, 0, 5), True)),
        ("2.0.5-1", Version(0, (2, 0, 5), True)),
        ("2.0.post1.dev1", Version(0, (2,), True)),
        ("2.0.5+debian.2", Version(0, (2, 0, 5), True)),
        ("2.0.5rc1+local", Version(0, (2, 0, 5), False)),
        ("v3.9.0", Version(0, (3, 9), True)),
        ("1!1.0", Version(1, (1,), True)),
        (" 3.14.5 ", Version(0, (3, 14, 5), True)),
    ],
)
def test_versions_parse_as_a_range_check_orders_them(text: str, expected: Version) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize("text", ["", "unknown", "2.x", "2.0.0-beta-unknown", "1.0+", "abc1.0"])
def test_what_is_not_a_version_parses_as_none(text: str) -> None:
    assert parse_version(text) is None


@pytest.mark.parametrize(
    ("specifier", "version", "admitted"),
    [
        (">= 2.0.0, < 2.2", "2.0.0", True),
        (">= 2.0.0, < 2.2", "2.0", True),
        (">= 2.0.0, < 2.2", "2.1.9", True),
        (">= 2.0.0, < 2.2", "2.2.0", False),
        (">= 2.0.0, < 2.2", "2.2.0rc1", False),  # a pre-release of the bound is not below it
        (">= 2.0.0, < 2.2", "2.2.0.dev1", False),
        (">= 2.0.0, < 2.2", "2.0.0rc2", False),  # nor is a pre-release of the lower bound in
        (">= 2.0.0, < 2.2", "1.4.54", False),
        (">= 2.0.0, < 2.2", "2.1.9.post1", True),
        (">= 2.0.0, < 2.2", "2.1.9+local", True),
        (">= 2.0.0, < 2.2", "2.1.10rc1", True),  # a pre-release inside the range is inside
        (">= 2.0.0, < 2.2", "1!2.1", False),
        (">= 1.31.0, < 2", "1.44.18", True),
        (">= 1.31.0, < 2", "1.9.0", False),  # numbers, not strings: 9 < 31
        (">= 1.31.0, < 2", "1.100", True),
        ("> 2.0", "2.0.0.post1", False),
        ("> 2.0", "2.0.1", True),
        ("<= 2.1", "2.1.0", True),
        ("<= 2.1", "2.1.1", False),
        ("== 2.0.7", "2.0.7", True),
        ("== 2.0.7", "2.0.8", False),
        (">= 2.0.2, != 2.2.0, < 3", "2.2.0", False),
        (">= 2.0.2, != 2.2.0, < 3", "2.2.1", True),
    ],
)
def test_a_range_admits_what_pep_440_admits(specifier: str, version: str, admitted: bool) -> None:
    parsed = parse_version(version)
    assert parsed is not None
    assert parse_requirement(f"lib {specifier}").admits(parsed) is admitted


def test_a_requirement_names_its_distribution_and_lowest_version() -> None:
    requirement = parse_requirement("SQLAlchemy >= 2.0.0, < 2.2")
    assert requirement.distribution == "sqlalchemy"
    assert requirement.specifier == ">= 2.0.0, < 2.2"
    assert requirement.clauses == (
        (">=", Version(0, (2,), True)),
        ("<", Version(0, (2, 2), True)),
    )
    assert requirement.lowest() == "2.0.0"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("sqlalchemy", "expected 'name >= version, < version'"),
        ("sqlalchemy ~= 2.0", "clause '~= 2.0' is not an operator"),
        ("sqlalchemy >= 2.0.*", "clause '>= 2.0.*' is not an operator"),
        ("sqlalchemy >= 2.0, < 2.2rc1", "(no pre-release bounds)"),
    ],
)
def test_a_malformed_requirement_says_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ValueError, match="requirement") as raised:
        parse_requirement(text)
    assert error in str(raised.value)
    assert repr(text) in str(raised.value)


# -- the ranges (a contract: README's status table shows them) -------------------------------

SUPPORTED = {
    "aiohttp": (("aiohttp >= 3.12.11, < 4",), ("aiobotocore >= 3.10.0, < 4",)),
    "asyncpg": (("asyncpg >= 0.30.0, < 1",), ()),
    "httpx": (("httpx >= 0.26.0, < 1", "httpcore >= 1.0.3, < 2"), ()),
    "redis": (("redis >= 8.2.0, < 9",), ()),
    "psycopg_pool": (("psycopg-pool >= 3.3.0, < 4",), ()),
    "sqlalchemy": (("sqlalchemy >= 2.0.0, < 2.2",), ()),
    "urllib3": (
        ("urllib3 >= 2.0.2, < 3",),
        ("requests >= 2.30.0, < 3", "botocore >= 1.31.63, < 2"),
    ),
}


def test_every_adapter_declares_its_ranges_as_data() -> None:
    declared = {name: (adapter.requires, adapter.tested_with) for name, adapter in ADAPTERS.items()}
    assert declared == SUPPORTED
    for requires, tested_with in declared.values():
        for text in requires + tested_with:
            requirement = parse_requirement(text)
            assert requirement.lowest()  # the compat run installs each lower bound


def test_the_readme_shows_every_range() -> None:
    readme = (REPO / "README.md").read_text()
    for requires, tested_with in SUPPORTED.values():
        for text in requires + tested_with:
            requirement = parse_requirement(text)
            assert f"{requirement.distribution} {requirement.specifier}" in readme, text


def test_the_versions_installed_here_are_supported() -> None:
    for adapter in ADAPTERS.values():
        assert _versions.mismatches(adapter.requires) == [], adapter.name
        assert _versions.mismatches(adapter.tested_with, only_installed=True) == []


def test_importlib_metadata_reports_a_distribution_put_first_on_the_path(
    installed_as: object,
) -> None:
    installed_as("SQLAlchemy", "1.4.54")  # type: ignore[operator]
    assert _versions.installed_version("sqlalchemy") == "1.4.54"
    assert _versions.mismatches(("sqlalchemy >= 2.0.0, < 2.2",)) == [
        _versions.Mismatch("sqlalchemy", "1.4.54", ">= 2.0.0, < 2.2")
    ]


def test_a_distribution_without_metadata_is_read_from_its_module() -> None:
    assert _versions.installed_version("poolwatch-no-such-distribution") is None
    # sqlalchemy is imported here; its __version__ is the fallback's answer.
    assert _versions.installed_version("sqlalchemy") == sqlalchemy.__version__


def test_a_library_that_is_not_installed_is_a_mismatch_only_when_required() -> None:
    requires = ("poolwatch-no-such-distribution >= 1.0",)
    assert _versions.mismatches(requires) == [
        _versions.Mismatch("poolwatch-no-such-distribution", None, ">= 1.0")
    ]
    assert str(_versions.mismatches(requires)[0]) == (
        "poolwatch-no-such-distribution of unknown version (supported: >= 1.0)"
    )
    assert _versions.mismatches(requires, only_installed=True) == []


# -- the gate ------------------------------------------------------------------------------


def test_a_library_outside_its_range_is_not_hooked_and_runs_on(
    harness: Harness, installed_as: object, caplog: pytest.LogCaptureFixture
) -> None:
    installed_as("SQLAlchemy", "1.4.54")  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="poolwatch"):
        handle = harness.instrument(libraries=["sqlalchemy"])
    assert handle.libraries == ()
    warnings = [r.getMessage() for r in caplog.records if r.name == "poolwatch"]
    assert warnings == [
        "poolwatch: sqlalchemy 1.4.54 (supported: >= 2.0.0, < 2.2) is outside the versions "
        "poolwatch supports: its pools are not hooked (the application runs on unchanged)"
    ]
    assert caplog.records[0].levelno == logging.WARNING
    engine = sqlalchemy.create_engine("sqlite://")
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("select 41 + 1")).scalar() == 42
    engine.dispose()
    assert poolwatch.pools() == []
    assert handle.errors == {}


def test_a_library_inside_its_range_is_hooked(harness: Harness, installed_as: object) -> None:
    installed_as("SQLAlchemy", "2.0.0")  # type: ignore[operator]
    handle = harness.instrument(libraries=["sqlalchemy"])
    assert handle.libraries == ("sqlalchemy",)


def test_a_second_library_of_an_adapter_outside_its_range_keeps_the_adapter_off(
    harness: Harness, installed_as: object, caplog: pytest.LogCaptureFixture
) -> None:
    import httpx  # noqa: F401 (imported before instrument(): hooked at once when supported)

    installed_as("httpcore", "0.18.0")  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="poolwatch"):
        handle = harness.instrument(libraries=["httpx"])
    assert handle.libraries == ()
    assert [r.getMessage() for r in caplog.records] == [
        "poolwatch: httpcore 0.18.0 (supported: >= 1.0.3, < 2) is outside the versions "
        "poolwatch supports: its pools are not hooked (the application runs on unchanged)"
    ]


def test_a_library_hooked_through_urllib3_outside_its_tested_range_is_still_hooked(
    harness: Harness, installed_as: object, caplog: pytest.LogCaptureFixture
) -> None:
    import urllib3  # noqa: F401

    installed_as("requests", "2.25.1")  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="poolwatch"):
        handle = harness.instrument(libraries=["urllib3"])
    assert handle.libraries == ("urllib3",)
    assert [r.getMessage() for r in caplog.records] == [
        "poolwatch: requests 2.25.1 (supported: >= 2.30.0, < 3) is outside the versions "
        "poolwatch is tested with; its pools are still hooked through urllib3, but may be "
        "reported as pool.kind urllib3"
    ]


def test_the_range_is_checked_when_the_application_imports_the_library(tmp_path: Path) -> None:
    # A fresh interpreter: SQLAlchemy imported after instrument(), by the post-import hook.
    fake = fake_distribution(tmp_path, "SQLAlchemy", "2.2.0")
    program = textwrap.dedent(
        f"""
        import logging, sys
        sys.path.insert(0, {str(fake)!r})
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        from opentelemetry.sdk.metrics import MeterProvider
        import poolwatch
        handle = poolwatch.instrument(meter_provider=MeterProvider(), process_view="off")
        import sqlalchemy
        engine = sqlalchemy.create_engine("sqlite://")
        with engine.connect() as connection:
            print(connection.execute(sqlalchemy.text("select 42")).scalar())
        print(handle.libraries, poolwatch.pools(), handle.errors)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["42", "() [] {}"]
    assert done.stderr.splitlines() == [
        "WARNING poolwatch: sqlalchemy 2.2.0 (supported: >= 2.0.0, < 2.2) is outside the "
        "versions poolwatch supports: its pools are not hooked (the application runs on "
        "unchanged)"
    ]
