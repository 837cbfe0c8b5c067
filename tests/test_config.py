"""Settings: argument over environment over default; bad values fail at instrument()."""

from __future__ import annotations

import pytest

import poolwatch
from poolwatch import _catalogue
from poolwatch._config import DEFAULT_LEAK_THRESHOLD, DEFAULT_MAX_POOLS, resolve

ADAPTERS = ("sqlalchemy",)


def test_defaults() -> None:
    s = resolve({}, {}, ADAPTERS)
    assert s.libraries == ("sqlalchemy",)
    assert s.semconv is False  # opt-in: Development-status conventions, twice the series
    assert s.leak_threshold == DEFAULT_LEAK_THRESHOLD == 30.0
    assert s.leak_stacks == "auto"
    assert s.max_pools == DEFAULT_MAX_POOLS == 200
    assert s.pool_names == {}
    assert s.buckets == _catalogue.DURATION_BUCKETS
    assert s.prometheus_port is None
    assert s.prometheus_host == "127.0.0.1"


def test_environment_is_read() -> None:
    env = {
        "POOLWATCH_LIBRARIES": "sqlalchemy",
        "POOLWATCH_SEMCONV": "on",
        "POOLWATCH_LEAK_THRESHOLD": "2.5",
        "POOLWATCH_MAX_POOLS": "7",
        "POOLWATCH_POOL_NAMES": "postgresql://db:5432/orders=orders, sqlite:///a.db=a",
        "POOLWATCH_BUCKETS": "0.001, 0.01,0.1",
        "POOLWATCH_PROMETHEUS_PORT": "9999",
        "POOLWATCH_PROMETHEUS_HOST": "0.0.0.0",
    }
    s = resolve({}, env, ADAPTERS)
    assert s.semconv is True
    assert s.leak_threshold == 2.5
    assert s.max_pools == 7
    assert s.pool_names == {"postgresql://db:5432/orders": "orders", "sqlite:///a.db": "a"}
    assert s.buckets == (0.001, 0.01, 0.1)
    assert s.prometheus_port == 9999
    assert s.prometheus_host == "0.0.0.0"


def test_argument_wins_over_environment() -> None:
    s = resolve({"max_pools": 3}, {"POOLWATCH_MAX_POOLS": "9"}, ADAPTERS)
    assert s.max_pools == 3


def test_leak_detection_can_be_disabled() -> None:
    assert resolve({}, {"POOLWATCH_LEAK_THRESHOLD": "off"}, ADAPTERS).leak_threshold is None
    assert resolve({"leak_threshold": None}, {}, ADAPTERS).leak_threshold is None


@pytest.mark.parametrize(
    ("arguments", "environ", "message"),
    [
        (
            {"max_pools": 0},
            {},
            "poolwatch setting 'max_pools' (argument) got 0: expected an int >= 1",
        ),
        (
            {},
            {"POOLWATCH_MAX_POOLS": "many"},
            "poolwatch setting 'max_pools' (environment variable POOLWATCH_MAX_POOLS) got "
            "'many': expected an int >= 1",
        ),
        (
            {"libraries": ["sqlalchemy", "psycopg2"]},
            {},
            "poolwatch setting 'libraries' (argument) got ['sqlalchemy', 'psycopg2']: "
            "expected a list drawn from sqlalchemy",
        ),
        (
            {"libraries": "sqlalchemy"},
            {},
            "poolwatch setting 'libraries' (argument) got 'sqlalchemy': "
            "expected a list drawn from sqlalchemy",
        ),
        (
            {"semconv": "yes"},
            {},
            "poolwatch setting 'semconv' (argument) got 'yes': expected true or false",
        ),
        (
            {"leak_threshold": -1},
            {},
            "poolwatch setting 'leak_threshold' (argument) got -1: expected a number of "
            "seconds > 0, or None/'off' to disable leak detection",
        ),
        (
            {},
            {"POOLWATCH_LEAK_STACKS": "sometimes"},
            "poolwatch setting 'leak_stacks' (environment variable POOLWATCH_LEAK_STACKS) got "
            "'sometimes': expected 'auto', 'always' or 'off'",
        ),
        (
            {"buckets": [0.1, 0.01]},
            {},
            "poolwatch setting 'buckets' (argument) got [0.1, 0.01]: expected strictly "
            "increasing positive finite seconds, e.g. '0.001,0.01,0.1,1'",
        ),
        (
            {"prometheus_port": 70000},
            {},
            "poolwatch setting 'prometheus_port' (argument) got 70000: expected a TCP port "
            "0-65535 (0 picks a free port)",
        ),
        (
            {"pool_names": {"postgresql://db/orders": "postgresql://bob:secret@db/orders"}},
            {},
            "poolwatch setting 'pool_names' (argument) got {'postgresql://db/orders': "
            "'postgresql://bob:secret@db/orders'}: expected a mapping of derived pool name to "
            "chosen name (env: 'target=name,target=name'); names are 1-200 printable "
            "characters without credentials or query strings",
        ),
        (
            {"pool_size": 5},
            {},
            "poolwatch.instrument() got unknown setting(s) 'pool_size': expected one of "
            "buckets, connection_max_age, leak_stacks, leak_threshold, libraries, "
            "lifetime_buckets, max_pools, meter_provider, pool_names, process_view, "
            "prometheus_host, prometheus_port, semconv, shutdown_timeout",
        ),
        (
            {},
            {"POOLWATCH_CONNECTION_MAX_AGE": "0"},
            "poolwatch setting 'connection_max_age' (environment variable "
            "POOLWATCH_CONNECTION_MAX_AGE) got '0': expected a number of seconds > 0, or "
            "None/'off' not to report old connections",
        ),
        (
            {"process_view": "yes"},
            {},
            "poolwatch setting 'process_view' (argument) got 'yes': expected 'auto', 'on' "
            "(needs psutil: pip install 'poolwatch[process]') or 'off'",
        ),
    ],
)
def test_bad_values_name_the_setting_the_value_and_what_is_allowed(
    arguments: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(poolwatch.ConfigError) as caught:
        resolve(arguments, environ, ADAPTERS)
    assert str(caught.value) == message


def test_instrument_raises_config_error_and_stays_uninstrumented() -> None:
    with pytest.raises(poolwatch.ConfigError):
        poolwatch.instrument(max_pools="ten")
    assert poolwatch.pools() == []


def test_meter_provider_must_be_an_sdk_provider() -> None:
    with pytest.raises(poolwatch.ConfigError) as caught:
        poolwatch.instrument(meter_provider=object())
    assert str(caught.value) == (
        "poolwatch setting 'meter_provider' (argument) got object: expected an "
        "opentelemetry.sdk.metrics.MeterProvider"
    )


def test_bad_exporter_environment_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp,statsd")
    with pytest.raises(poolwatch.ConfigError) as caught:
        poolwatch.instrument(prometheus_port=0)
    assert str(caught.value) == (
        "poolwatch: environment variable OTEL_METRICS_EXPORTER got 'otlp,statsd': expected a "
        "comma-separated list of otlp, prometheus, console, none"
    )
