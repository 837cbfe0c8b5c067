"""Settings from ``instrument()`` arguments and ``POOLWATCH_*`` environment variables.

An argument wins over its environment variable, which wins over the default. A bad value
raises :class:`ConfigError` at ``instrument()`` naming the setting, where it came from,
the value, and what is allowed — never later, on the application's hot path. Whatever the
value is, only a ConfigError comes out (an iterable that raises, a number too large for a
float), and the value is shown without credentials and at most ``SHOWN`` characters long.
"""

from __future__ import annotations

import difflib
import itertools
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from poolwatch import _catalogue
from poolwatch._naming import MAX_NAME, carries_credentials, check_pool_name, redacted

DEFAULT_LEAK_THRESHOLD = 30.0
LEAK_STACKS = ("auto", "always", "off")
DEFAULT_MAX_POOLS = 200
DEFAULT_PROMETHEUS_HOST = "127.0.0.1"
PROCESS_VIEW = ("auto", "on", "off")
DEFAULT_SHUTDOWN_TIMEOUT = 2.0
DEFAULT_WAIT_SPAN_THRESHOLD: float | None = 0.001
"""Seconds: a wait for a connection longer than this gets a span. Below a millisecond a
wait is the checkout's own work (a pre-ping, a loopback connect), not a queue: a span there
would be noise, and spans cost tens of microseconds each to record and export."""
"""Seconds ``uninstrument()`` and interpreter exit wait for poolwatch's own exporters.

A healthy collector takes milliseconds to take the last export (tens over a slow TLS
link); 2 s also fits the SDK's first retry after its 1 s back-off, and is a fifth of the
shortest grace a process manager commonly gives before SIGKILL (``docker stop``: 10 s;
Kubernetes and gunicorn: 30 s), which the application needs for its own draining.
"""
MAX_SHUTDOWN_TIMEOUT = 600.0
"""Longer than any process manager's default grace period; beyond it, waits overflow."""

MAX_BUCKETS = 160
"""Most bounds a histogram may have: the default size of OpenTelemetry's exponential
histograms (``max_size``), ten times the SDK's explicit default (15 bounds) and
Prometheus's (14). Each bound is one Prometheus series per histogram point, about four
points a pool: 160 bounds are some 640 series a pool. 200,000 bounds once took 1.3 s to
instrument, 3.1 s a collection and 346 MB."""
MAX_MAX_POOLS = 20_000
"""Largest ``max_pools``: the cap is what bounds a process's series, so it has one itself.
The benchmarks measure up to 10,000 series and set this much; 20,000 series are about
250 MB of ledgers and two million Prometheus series at the default buckets."""
MAX_LIBRARIES = 64
"""Most entries the ``libraries`` setting is read for (an endless iterable stops here)."""
MAX_SERVER_LIMITS = 1000
"""Most servers ``server_limits`` may declare: each is one exported series per process."""
MAX_SERVER_CONNECTIONS = 10_000_000
"""Largest connection limit a server may be declared with (PostgreSQL's own
``max_connections`` stops at 262,143; a managed cache's at tens of thousands)."""
_SERVER = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]{2,45})\]|(?P<host>[A-Za-z0-9._\-]{1,253})):(?P<port>[0-9]{1,5})"
)
"""``host:port`` or ``[ipv6]:port``: a server as pools address it (``server.address``)."""
SHOWN = 200
"""Most characters of a rejected value a ConfigError shows."""
_NOT_SETTINGS = ("POOLWATCH_DEMO_",)
"""``POOLWATCH_*`` variables that belong to something else (the demo stack's)."""

_T = TypeVar("_T")
_logger = logging.getLogger("poolwatch")
_DEFAULT_LEAK: float | None = DEFAULT_LEAK_THRESHOLD


class ConfigError(ValueError):
    """A poolwatch setting has a value poolwatch cannot use."""


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one ``instrument()`` call."""

    libraries: tuple[str, ...]
    """Libraries to hook, by adapter name."""
    semconv: bool = False
    """Also emit semantic-convention mirrors (``db.client.connection.*``, ``http.client.*``).

    Off by default: the conventions are at Development status, and the mirrors double a
    pool's series (docs/architecture.md, "Semantic-convention mirrors are opt-in").
    """
    leak_threshold: float | None = DEFAULT_LEAK_THRESHOLD
    """Seconds a checkout may be held before it counts as a leak; None disables."""
    leak_stacks: str = "auto"
    """When to capture the borrower's stack at checkout, for the leak WARNING: ``auto`` —
    for a pool's checkouts once it has leaked; ``always``; ``off``."""
    max_pools: int = DEFAULT_MAX_POOLS
    """Pool series tracked before further pools fold into an overflow series."""
    pool_names: Mapping[str, str] = field(default_factory=dict)
    """Pool names chosen by the user, keyed by the derived name (the target)."""
    buckets: tuple[float, ...] = _catalogue.DURATION_BUCKETS
    """Bucket boundaries (seconds) of the wait, use and connect histograms."""
    lifetime_buckets: tuple[float, ...] = _catalogue.LIFETIME_BUCKETS
    """Bucket boundaries (seconds) of the connection-lifetime histogram."""
    prometheus_port: int | None = None
    """Serve a Prometheus endpoint on this port (0 picks a free one)."""
    prometheus_host: str = DEFAULT_PROMETHEUS_HOST
    """Address the Prometheus endpoint binds to."""
    connection_max_age: float | None = None
    """Seconds after which an open connection is reported as too old (``connection_too_old``:
    it keeps the address DNS gave when it opened); None disables."""
    process_view: str = "auto"
    """File descriptors and TCP connections of the process (psutil): ``auto`` — when psutil
    is installed; ``on`` — psutil is required; ``off``."""
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    """Seconds ``uninstrument()`` and interpreter exit wait for the last export of a provider
    poolwatch built (and its Prometheus endpoint, and its thread) before giving up on it."""
    wait_span_threshold: float | None = DEFAULT_WAIT_SPAN_THRESHOLD
    """Waits for a connection (and connects) longer than this, in seconds, are recorded as
    spans (``pool.wait``, ``pool.connect``) under the caller's span, and their ids as
    exemplars of the histograms; None (``off``) records none."""
    server_limits: Mapping[tuple[str, int], int] = field(default_factory=dict)
    """Connection limits of servers, by (``server.address``, ``server.port``): what a server
    accepts from all its clients together (PostgreSQL's ``max_connections`` less its
    reserved connections, a managed cache's limit), exported as
    ``poolwatch.server.connections.limit`` so that rules can set every instance's
    connections to that server against it."""


def _env_name(setting: str) -> str:
    return "POOLWATCH_" + setting.upper()


class Rejected(ValueError):
    """A value is not allowed, for the reason given (said in the ConfigError)."""


def shown(value: object) -> str:
    """``repr(value)`` for an error message: without credentials (:func:`redacted`), on one
    line, at most ``SHOWN`` characters; a value whose ``repr`` fails by its type."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    text = redacted(text)
    if len(text) > SHOWN:
        text = f"{text[: SHOWN - 30]}… ({len(text)} characters)"
    return text


def _fail(
    setting: str, source: str, value: object, allowed: str, reason: str | None = None
) -> ConfigError:
    why = f" ({reason})" if reason else ""
    return ConfigError(
        f"poolwatch setting {setting!r} ({source}) got {shown(value)}{why}: expected {allowed}"
    )


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


class _Resolver:
    """Looks each setting up in the arguments, then the environment."""

    def __init__(self, arguments: Mapping[str, Any], environ: Mapping[str, str]) -> None:
        self._arguments = arguments
        self._environ = environ

    def get(
        self,
        setting: str,
        default: _T,
        from_env: Callable[[str], Any],
        check: Callable[[Any], _T],
        allowed: str,
    ) -> _T:
        if setting in self._arguments:
            source, raw = "argument", self._arguments[setting]
            value = raw
        elif _env_name(setting) in self._environ:
            source, raw = (
                f"environment variable {_env_name(setting)}",
                self._environ[_env_name(setting)],
            )
            try:
                value = from_env(raw)
            except Exception as error:
                raise _fail(setting, source, raw, allowed, _reason(error)) from None
        else:
            return default
        try:
            return check(value)
        except Exception as error:  # whatever the value does: an iterable that raises, …
            raise _fail(setting, source, raw, allowed, _reason(error)) from None


def _reason(error: Exception) -> str | None:
    return str(error) if isinstance(error, Rejected) else None


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


def _check_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(value)
    return value


def _check_max_pools(value: Any) -> int:
    if _check_positive_int(value) > MAX_MAX_POOLS:
        raise ValueError(value)
    return int(value)


def _check_port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(value)
    return value


def _check_host(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]{1,253}", value):
        raise ValueError(value)  # 253: the longest DNS name
    return value


def _leak_from_env(text: str) -> float | None:
    if text.strip().lower() in ("off", "none", "disabled", ""):
        return None
    return float(text)


def _check_leak(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(value)
    return float(value)


def _check_age(value: Any) -> float | None:
    return _check_leak(value)


def _shutdown_from_env(text: str) -> float:
    return float(text)


def _check_shutdown(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    if not 0 <= value <= MAX_SHUTDOWN_TIMEOUT:  # NaN fails both comparisons
        raise ValueError(value)
    return float(value)


def _check_process_view(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    chosen = value.strip().lower()
    if chosen not in PROCESS_VIEW:
        raise ValueError(value)
    if chosen == "on" and not psutil_importable():
        raise ValueError(value)
    return chosen


def psutil_importable() -> bool:
    """Whether the process view's psutil (the ``process`` extra) imports."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


def _check_leak_stacks(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    if value.strip().lower() not in LEAK_STACKS:
        raise ValueError(value)
    return value.strip().lower()


def _check_buckets(value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)):
        raise TypeError(value)
    items = list(itertools.islice(value, MAX_BUCKETS + 1))  # an endless iterable stops here
    if len(items) > MAX_BUCKETS:
        raise Rejected(f"more than {MAX_BUCKETS} bounds")
    bounds = tuple(float(v) for v in items if not isinstance(v, bool))
    if len(bounds) != len(items) or not bounds:
        raise ValueError(value)
    if any(not math.isfinite(b) or b <= 0 for b in bounds):
        raise ValueError(value)
    if any(b >= c for b, c in itertools.pairwise(bounds)):
        raise ValueError(value)
    return bounds


def _buckets_from_env(text: str) -> list[float]:
    return [float(part) for part in _parse_list(text)]


def _names_from_env(text: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for item in _parse_list(text):
        target, sep, name = item.rpartition("=")
        if not sep or not target.strip():
            raise ValueError(item)
        names[target.strip()] = name.strip()
    return names


def _check_names(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(value)
    names: dict[str, str] = {}
    for target, name in value.items():
        if not isinstance(target, str) or not 1 <= len(target) <= MAX_NAME:
            raise ValueError(target)
        if carries_credentials(target):  # a derived name never does: it could never match
            raise Rejected("a derived name never carries credentials or a query string")
        if isinstance(name, str) and carries_credentials(name):
            raise Rejected("a name must not carry credentials or a query string")
        names[target] = check_pool_name(name)
    return names


def _server_limits_from_env(text: str) -> dict[str, int]:
    limits: dict[str, int] = {}
    for item in _parse_list(text):
        server, sep, limit = item.rpartition("=")
        if not sep or not server.strip():
            raise ValueError(item)
        if server.strip() in limits:
            raise Rejected(f"{shown(server.strip())} is declared twice")
        limits[server.strip()] = int(limit)
    return limits


def _server(text: Any) -> tuple[str, int]:
    """(address, port) of a ``host:port`` or ``[ipv6]:port`` key of ``server_limits``."""
    if not isinstance(text, str):
        raise TypeError(text)
    if carries_credentials(text) or "/" in text:
        raise Rejected(
            f"{shown(text)} is not host:port: a server is named without a scheme, "
            "credentials, path or query string"
        )
    match = _SERVER.fullmatch(text.strip())
    if match is None:
        raise Rejected(f"{shown(text)} is not host:port")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise Rejected(f"port {port} of {shown(text)} is not 1-65535")
    return match["ipv6"] or match["host"], port


def _check_server_limits(value: Any) -> dict[tuple[str, int], int]:
    if not isinstance(value, Mapping):
        raise TypeError(value)
    items = list(itertools.islice(value.items(), MAX_SERVER_LIMITS + 1))
    if len(items) > MAX_SERVER_LIMITS:
        raise Rejected(f"more than {MAX_SERVER_LIMITS} servers")
    limits: dict[tuple[str, int], int] = {}
    for server, limit in items:
        key = _server(server)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise Rejected(f"the limit of {shown(server)} is {shown(limit)}, not an int")
        if not 1 <= limit <= MAX_SERVER_CONNECTIONS:
            raise Rejected(f"the limit of {shown(server)} is {limit}")
        if key in limits:
            raise Rejected(f"{shown(server)} is declared twice")
        limits[key] = limit
    return limits


def _warn_unknown_variables(environ: Mapping[str, str]) -> None:
    """A ``POOLWATCH_*`` variable close to a setting's name is likely a typo: say so once."""
    known = [_env_name(f) for f in Settings.__dataclass_fields__]
    for variable in sorted(environ):
        if not variable.startswith("POOLWATCH_") or variable in known:
            continue
        if variable.startswith(_NOT_SETTINGS):
            continue
        close = difflib.get_close_matches(variable, known, n=1, cutoff=0.8)
        if close:
            _logger.warning(
                "poolwatch: environment variable %s is not a poolwatch setting and is ignored; "
                "did you mean %s?",
                shown(variable)[1:-1],
                close[0],
            )


def resolve(
    arguments: Mapping[str, Any], environ: Mapping[str, str], adapters: tuple[str, ...]
) -> Settings:
    """Resolve settings; ``adapters`` are the library names this poolwatch can hook."""
    known = {f for f in Settings.__dataclass_fields__} | {"meter_provider", "tracer_provider"}
    unknown = sorted(set(arguments) - known, key=str)
    if unknown:
        raise ConfigError(
            f"poolwatch.instrument() got unknown setting(s) {', '.join(map(shown, unknown))}: "
            f"expected one of {', '.join(sorted(known))}"
        )
    _warn_unknown_variables(environ)
    env = _Resolver(arguments, environ)

    def check_libraries(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            raise TypeError(value)
        items = list(itertools.islice(value, MAX_LIBRARIES + 1))
        if len(items) > MAX_LIBRARIES:
            raise ValueError(value)
        chosen = tuple(dict.fromkeys(items))
        if any(lib not in adapters for lib in chosen):
            raise ValueError(value)
        return chosen

    allowed_libs = f"a list drawn from {', '.join(adapters)}"
    return Settings(
        libraries=env.get("libraries", adapters, _parse_list, check_libraries, allowed_libs),
        semconv=env.get("semconv", False, _parse_bool, _check_bool, "true or false"),
        leak_threshold=env.get(
            "leak_threshold",
            _DEFAULT_LEAK,
            _leak_from_env,
            _check_leak,
            "a number of seconds > 0, or None/'off' to disable leak detection",
        ),
        leak_stacks=env.get(
            "leak_stacks", "auto", str, _check_leak_stacks, "'auto', 'always' or 'off'"
        ),
        max_pools=env.get(
            "max_pools",
            DEFAULT_MAX_POOLS,
            int,
            _check_max_pools,
            f"an int from 1 to {MAX_MAX_POOLS}",
        ),
        pool_names=env.get(
            "pool_names",
            {},
            _names_from_env,
            _check_names,
            "a mapping of derived pool name to chosen name (env: 'target=name,target=name'); "
            f"names are 1-{MAX_NAME} printable characters without credentials or query strings",
        ),
        buckets=env.get(
            "buckets",
            _catalogue.DURATION_BUCKETS,
            _buckets_from_env,
            _check_buckets,
            f"at most {MAX_BUCKETS} strictly increasing positive finite seconds, "
            "e.g. '0.001,0.01,0.1,1'",
        ),
        lifetime_buckets=env.get(
            "lifetime_buckets",
            _catalogue.LIFETIME_BUCKETS,
            _buckets_from_env,
            _check_buckets,
            f"at most {MAX_BUCKETS} strictly increasing positive finite seconds, e.g. '1,60,3600'",
        ),
        prometheus_port=env.get(
            "prometheus_port", None, int, _check_port, "a TCP port 0-65535 (0 picks a free port)"
        ),
        prometheus_host=env.get(
            "prometheus_host",
            DEFAULT_PROMETHEUS_HOST,
            str,
            _check_host,
            "an IP address or host name to bind to",
        ),
        connection_max_age=env.get(
            "connection_max_age",
            None,
            _leak_from_env,
            _check_age,
            "a number of seconds > 0, or None/'off' not to report old connections",
        ),
        process_view=env.get(
            "process_view",
            "auto",
            str,
            _check_process_view,
            "'auto', 'on' (needs psutil: pip install 'poolwatch[process]') or 'off'",
        ),
        shutdown_timeout=env.get(
            "shutdown_timeout",
            DEFAULT_SHUTDOWN_TIMEOUT,
            _shutdown_from_env,
            _check_shutdown,
            f"a number of seconds from 0 to {MAX_SHUTDOWN_TIMEOUT:g}",
        ),
        server_limits=env.get(
            "server_limits",
            {},
            _server_limits_from_env,
            _check_server_limits,
            "a mapping of server 'host:port' to its connection limit, an int from 1 to "
            f"{MAX_SERVER_CONNECTIONS:,} (env: 'db.internal:5432=480,[fd00::5]:6379=10000'), "
            f"at most {MAX_SERVER_LIMITS} servers",
        ),
        wait_span_threshold=env.get(
            "wait_span_threshold",
            DEFAULT_WAIT_SPAN_THRESHOLD,
            _leak_from_env,
            _check_leak,
            "a number of seconds > 0, or None/'off' to record no spans",
        ),
    )
