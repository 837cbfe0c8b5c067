"""Settings: argument over environment over default; bad values fail at instrument()."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider

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
            "poolwatch setting 'max_pools' (argument) got 0: expected an int from 1 to 20000",
        ),
        (
            {},
            {"POOLWATCH_MAX_POOLS": "many"},
            "poolwatch setting 'max_pools' (environment variable POOLWATCH_MAX_POOLS) got "
            "'many': expected an int from 1 to 20000",
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
            "poolwatch setting 'buckets' (argument) got [0.1, 0.01]: expected at most 160 "
            "strictly increasing positive finite seconds, e.g. '0.001,0.01,0.1,1'",
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
            "'postgresql://***@db/orders'} (a name must not carry credentials or a query "
            "string): expected a mapping of derived pool name to chosen name (env: "
            "'target=name,target=name'); names are 1-200 printable characters without "
            "credentials or query strings",
        ),
        (
            {"pool_size": 5},
            {},
            "poolwatch.instrument() got unknown setting(s) 'pool_size': expected one of "
            "buckets, connection_max_age, leak_stacks, leak_threshold, libraries, "
            "lifetime_buckets, max_pools, meter_provider, pool_names, process_view, "
            "prometheus_host, prometheus_port, semconv, server_limits, shutdown_timeout, "
            "tracer_provider, wait_span_threshold",
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


def test_server_limits_are_read_from_arguments_and_the_environment() -> None:
    assert resolve({}, {}, ADAPTERS).server_limits == {}
    env = {"POOLWATCH_SERVER_LIMITS": "db.internal:5432=97, [fd00::5]:6379=10000,cache_1:11211=1"}
    assert resolve({}, env, ADAPTERS).server_limits == {
        ("db.internal", 5432): 97,
        ("fd00::5", 6379): 10000,  # server.address holds an IPv6 address without brackets
        ("cache_1", 11211): 1,
    }
    argument = {"db.internal:5432": 480}
    assert resolve({"server_limits": argument}, env, ADAPTERS).server_limits == {
        ("db.internal", 5432): 480
    }
    most = {f"db-{i}:5432": 10_000_000 for i in range(1000)}
    assert len(resolve({"server_limits": most}, {}, ADAPTERS).server_limits) == 1000


SERVERS_ALLOWED = (
    "a mapping of server 'host:port' to its connection limit, an int from 1 to 10,000,000 "
    "(env: 'db.internal:5432=480,[fd00::5]:6379=10000'), at most 1000 servers"
)


@pytest.mark.parametrize(
    ("arguments", "environ", "message"),
    [
        (
            {"server_limits": {"db.internal": 97}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db.internal': 97} "
            f"('db.internal' is not host:port): expected {SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {"db.internal:5432": 0}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db.internal:5432': 0} (the "
            f"limit of 'db.internal:5432' is 0): expected {SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {"db:5432": 10_000_001}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db:5432': 10000001} (the "
            f"limit of 'db:5432' is 10000001): expected {SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {"db:5432": 97.0}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db:5432': 97.0} (the limit of "
            f"'db:5432' is 97.0, not an int): expected {SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {"db:65536": 97}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db:65536': 97} (port 65536 of "
            f"'db:65536' is not 1-65535): expected {SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {"db:5432": 97, "db:05432": 3}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db:5432': 97, 'db:05432': 3} "
            f"('db:05432' is declared twice): expected {SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": ["db:5432"]},
            {},
            f"poolwatch setting 'server_limits' (argument) got ['db:5432']: expected "
            f"{SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {f"db-{i}:5432": 1 for i in range(1001)}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db-0:5432': 1, 'db-1:5432': 1, "
            "'db-2:5432': 1, 'db-3:5432': 1, 'db-4:5432': 1, 'db-5:5432': 1, 'db-6:5432': 1, "
            "'db-7:5432': 1, 'db-8:5432': 1, 'db-9:5432': 1, 'db-10:54… (17909 characters) (more "
            "than 1000 servers): expected "
            f"{SERVERS_ALLOWED}",
        ),
        (
            {},
            {"POOLWATCH_SERVER_LIMITS": "db:5432=97,db:5432=98"},
            "poolwatch setting 'server_limits' (environment variable POOLWATCH_SERVER_LIMITS) "
            f"got 'db:5432=97,db:5432=98' ('db:5432' is declared twice): expected "
            f"{SERVERS_ALLOWED}",
        ),
        (
            {},
            {"POOLWATCH_SERVER_LIMITS": "db:5432=ninety"},
            "poolwatch setting 'server_limits' (environment variable POOLWATCH_SERVER_LIMITS) "
            f"got 'db:5432=ninety': expected {SERVERS_ALLOWED}",
        ),
        (  # a server named by its URL, credentials included: redacted, and refused
            {},
            {"POOLWATCH_SERVER_LIMITS": "postgresql://bob:secret@db:5432=97"},
            "poolwatch setting 'server_limits' (environment variable POOLWATCH_SERVER_LIMITS) "
            "got 'postgresql://***@db:5432=97' ('postgresql://***@db:5432' is not host:port: "
            "a server is named without a scheme, credentials, path or query string): expected "
            f"{SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {"bob:secret@db:5432": 97}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'***@db:5432': 97} ('***@db:5432' "
            "is not host:port: a server is named without a scheme, credentials, path or query "
            f"string): expected {SERVERS_ALLOWED}",
        ),
        (
            {"server_limits": {"db:5432?password=abc": 97}},
            {},
            "poolwatch setting 'server_limits' (argument) got {'db:5432?***': 97} ('db:5432?***' "
            "is not host:port: a server is named without a scheme, credentials, path or query "
            f"string): expected {SERVERS_ALLOWED}",
        ),
    ],
)
def test_bad_server_limits_are_named_without_credentials(
    arguments: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(poolwatch.ConfigError) as caught:
        resolve(arguments, environ, ADAPTERS)
    assert str(caught.value) == message
    assert "secret" not in message and "bob" not in message and "abc" not in message


class _Raising:
    """An iterable that fails while it is read, as a broken generator would."""

    def __iter__(self) -> Iterator[float]:
        yield 0.1
        raise RuntimeError("the source went away")

    def __repr__(self) -> str:
        return "_Raising()"


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


LEAK_ALLOWED = "a number of seconds > 0, or None/'off' to disable leak detection"


@pytest.mark.parametrize(
    ("arguments", "environ", "message"),
    [
        (  # math.isfinite() overflows on it: an OverflowError escaped before
            {"leak_threshold": 10**400},
            {},
            f"poolwatch setting 'leak_threshold' (argument) got {'1' + '0' * 169}… (401 "
            f"characters): expected {LEAK_ALLOWED}",
        ),
        (
            {"connection_max_age": 10**400},
            {},
            f"poolwatch setting 'connection_max_age' (argument) got {'1' + '0' * 169}… (401 "
            "characters): expected a number of seconds > 0, or None/'off' not to report old "
            "connections",
        ),
        (  # a RuntimeError escaped before
            {"buckets": _Raising()},
            {},
            "poolwatch setting 'buckets' (argument) got _Raising(): expected at most 160 "
            "strictly increasing positive finite seconds, e.g. '0.001,0.01,0.1,1'",
        ),
        (
            {"libraries": _Raising()},
            {},
            "poolwatch setting 'libraries' (argument) got _Raising(): expected a list drawn "
            "from sqlalchemy",
        ),
        (
            {"leak_threshold": _Unprintable()},
            {},
            f"poolwatch setting 'leak_threshold' (argument) got <_Unprintable object>: "
            f"expected {LEAK_ALLOWED}",
        ),
        (
            {"buckets": [i / 1000 for i in range(1, 162)]},
            {},
            "poolwatch setting 'buckets' (argument) got [0.001, 0.002, 0.003, 0.004, 0.005, "
            "0.006, 0.007, 0.008, 0.009, 0.01, 0.011, 0.012, 0.013, 0.014, 0.015, 0.016, 0.017, "
            "0.018, 0.019, 0.02, 0.021, 0.022, 0.023, 0.024, 0.0… (1110 characters) (more "
            "than 160 bounds): expected at most 160 strictly increasing "
            "positive finite seconds, e.g. '0.001,0.01,0.1,1'",
        ),
        (
            {"max_pools": 20_001},
            {},
            "poolwatch setting 'max_pools' (argument) got 20001: expected an int from 1 to 20000",
        ),
        (  # the target carries the credential: redacted, and rejected (it could never match)
            {},
            {"POOLWATCH_POOL_NAMES": "postgresql://bob:secret@db/orders=orders"},
            "poolwatch setting 'pool_names' (environment variable POOLWATCH_POOL_NAMES) got "
            "'postgresql://***@db/orders=orders' (a derived name never carries credentials or "
            "a query string): expected a mapping of derived pool name to chosen name (env: "
            "'target=name,target=name'); names are 1-200 printable characters without "
            "credentials or query strings",
        ),
        (  # a password without a scheme before it is a credential too
            {"pool_names": {"postgresql://db/orders": "bob:secret@db"}},
            {},
            "poolwatch setting 'pool_names' (argument) got {'postgresql://db/orders': "
            "'***@db'} (a name must not carry credentials or a query string): expected a "
            "mapping of derived pool name to chosen name (env: 'target=name,target=name'); "
            "names are 1-200 printable characters without credentials or query strings",
        ),
        (
            {"pool_names": {"https://api/v1": "https://api/v1?token=abc"}},
            {},
            "poolwatch setting 'pool_names' (argument) got {'https://api/v1': "
            "'https://api/v1?***'} (a name must not carry credentials or a query string): "
            "expected a mapping of derived pool name to chosen name (env: "
            "'target=name,target=name'); names are 1-200 printable characters without "
            "credentials or query strings",
        ),
        (
            {"postgresql://bob:secret@db/orders": "orders"},
            {},
            "poolwatch.instrument() got unknown setting(s) 'postgresql://***@db/orders': "
            "expected one of buckets, connection_max_age, leak_stacks, leak_threshold, "
            "libraries, lifetime_buckets, max_pools, meter_provider, pool_names, process_view, "
            "prometheus_host, prometheus_port, semconv, server_limits, shutdown_timeout, "
            "tracer_provider, wait_span_threshold",
        ),
        (
            {"prometheus_host": "a" * 254},
            {},
            f"poolwatch setting 'prometheus_host' (argument) got '{'a' * 169}… (256 "
            "characters): expected an IP address or host name to bind to",
        ),
        (
            {"shutdown_timeout": float("nan")},
            {},
            "poolwatch setting 'shutdown_timeout' (argument) got nan: expected a number of "
            "seconds from 0 to 600",
        ),
        (
            {},
            {"POOLWATCH_SHUTDOWN_TIMEOUT": "601"},
            "poolwatch setting 'shutdown_timeout' (environment variable "
            "POOLWATCH_SHUTDOWN_TIMEOUT) got '601': expected a number of seconds from 0 to 600",
        ),
        (
            {"shutdown_timeout": True},
            {},
            "poolwatch setting 'shutdown_timeout' (argument) got True: expected a number of "
            "seconds from 0 to 600",
        ),
    ],
)
def test_any_bad_value_is_a_config_error_without_credentials(
    arguments: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(poolwatch.ConfigError) as caught:
        resolve(arguments, environ, ADAPTERS)
    assert str(caught.value) == message
    assert "secret" not in message and "bob" not in message and "abc" not in message


def test_bounds_up_to_the_cap_are_accepted() -> None:
    bounds = tuple(i / 1000 for i in range(1, 161))
    assert resolve({"buckets": bounds}, {}, ADAPTERS).buckets == bounds
    assert resolve({"max_pools": 20_000}, {}, ADAPTERS).max_pools == 20_000


def test_a_misspelt_variable_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "POOLWATCH_LEAK_TRESHOLD": "5",  # misspelt
        "POOLWATCH_DEMO_SCENARIO": "leak",  # the demo stack's own
        "POOLWATCH_SOMETHING_ELSE": "1",  # not close to any setting: another tool's
    }
    with caplog.at_level("WARNING", logger="poolwatch"):
        settings = resolve({}, env, ADAPTERS)
    assert settings.leak_threshold == DEFAULT_LEAK_THRESHOLD
    assert [r.getMessage() for r in caplog.records] == [
        "poolwatch: environment variable POOLWATCH_LEAK_TRESHOLD is not a poolwatch setting and "
        "is ignored; did you mean POOLWATCH_LEAK_THRESHOLD?"
    ]


def test_track_names_are_checked_without_echoing_credentials(tmp_path: Path) -> None:
    import sqlalchemy as sa

    poolwatch.instrument(process_view="off", meter_provider=MeterProvider())
    engine = sa.create_engine(f"sqlite:///{tmp_path}/t.db")
    with pytest.raises(poolwatch.ConfigError) as caught:
        poolwatch.track(engine, name="bob:secret@db")
    assert str(caught.value) == (
        "poolwatch.track() got name '***@db': expected 1-200 printable ASCII characters "
        "without credentials or a query string"
    )


def test_a_prometheus_port_out_of_range_in_the_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "70000")  # OverflowError from bind()
    with pytest.raises(poolwatch.ConfigError) as caught:
        poolwatch.instrument(process_view="off")
    assert str(caught.value) == (
        "poolwatch: environment variable OTEL_EXPORTER_PROMETHEUS_PORT got '70000': expected a "
        "TCP port 0-65535"
    )
    assert poolwatch.pools() == []


def test_wait_span_threshold_is_seconds_or_off() -> None:
    assert resolve({}, {}, ("sqlalchemy",)).wait_span_threshold == 0.001
    assert resolve({"wait_span_threshold": 0.05}, {}, ("sqlalchemy",)).wait_span_threshold == 0.05
    assert resolve({"wait_span_threshold": None}, {}, ()).wait_span_threshold is None
    off = {"POOLWATCH_WAIT_SPAN_THRESHOLD": "off"}
    assert resolve({}, off, ()).wait_span_threshold is None
    with pytest.raises(poolwatch.ConfigError) as caught:
        resolve({"wait_span_threshold": -1}, {}, ())
    assert str(caught.value) == (
        "poolwatch setting 'wait_span_threshold' (argument) got -1: expected a number of "
        "seconds > 0, or None/'off' to record no spans"
    )
