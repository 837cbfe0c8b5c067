"""Settings from ``instrument()`` arguments and ``POOLWATCH_*`` environment variables.

An argument wins over its environment variable, which wins over the default. A bad value
raises :class:`ConfigError` at ``instrument()`` naming the setting, where it came from,
the value, and what is allowed — never later, on the application's hot path.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from poolwatch import _catalogue
from poolwatch._naming import check_pool_name

DEFAULT_LEAK_THRESHOLD = 30.0
LEAK_STACKS = ("auto", "always", "off")
DEFAULT_MAX_POOLS = 200
DEFAULT_PROMETHEUS_HOST = "127.0.0.1"
PROCESS_VIEW = ("auto", "on", "off")
DEFAULT_SHUTDOWN_TIMEOUT = 2.0
"""Seconds ``uninstrument()`` and interpreter exit wait for poolwatch's own exporters.

A healthy collector takes milliseconds to take the last export (tens over a slow TLS
link); 2 s also fits the SDK's first retry after its 1 s back-off, and is a fifth of the
shortest grace a process manager commonly gives before SIGKILL (``docker stop``: 10 s;
Kubernetes and gunicorn: 30 s), which the application needs for its own draining.
"""
MAX_SHUTDOWN_TIMEOUT = 600.0
"""Longer than any process manager's default grace period; beyond it, waits overflow."""

_T = TypeVar("_T")
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


def _env_name(setting: str) -> str:
    return "POOLWATCH_" + setting.upper()


def _fail(setting: str, source: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(
        f"poolwatch setting {setting!r} ({source}) got {value!r}: expected {allowed}"
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
            except (ValueError, TypeError):
                raise _fail(setting, source, raw, allowed) from None
        else:
            return default
        try:
            return check(value)
        except (ValueError, TypeError):
            raise _fail(setting, source, raw, allowed) from None


def _check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(value)
    return value


def _check_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(value)
    return value


def _check_port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(value)
    return value


def _check_host(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]+", value):
        raise ValueError(value)
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
    bounds = tuple(float(v) for v in value if not isinstance(v, bool))
    if len(bounds) != len(value) or not bounds:
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
        if not isinstance(target, str) or not target:
            raise ValueError(target)
        names[target] = check_pool_name(name)
    return names


def resolve(
    arguments: Mapping[str, Any], environ: Mapping[str, str], adapters: tuple[str, ...]
) -> Settings:
    """Resolve settings; ``adapters`` are the library names this poolwatch can hook."""
    known = {f for f in Settings.__dataclass_fields__} | {"meter_provider"}
    unknown = sorted(set(arguments) - known)
    if unknown:
        raise ConfigError(
            f"poolwatch.instrument() got unknown setting(s) {', '.join(map(repr, unknown))}: "
            f"expected one of {', '.join(sorted(known))}"
        )
    env = _Resolver(arguments, environ)

    def check_libraries(value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            raise TypeError(value)
        chosen = tuple(dict.fromkeys(value))
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
        max_pools=env.get("max_pools", DEFAULT_MAX_POOLS, int, _check_positive_int, "an int >= 1"),
        pool_names=env.get(
            "pool_names",
            {},
            _names_from_env,
            _check_names,
            "a mapping of derived pool name to chosen name (env: 'target=name,target=name'); "
            "names are 1-200 printable characters without credentials or query strings",
        ),
        buckets=env.get(
            "buckets",
            _catalogue.DURATION_BUCKETS,
            _buckets_from_env,
            _check_buckets,
            "strictly increasing positive finite seconds, e.g. '0.001,0.01,0.1,1'",
        ),
        lifetime_buckets=env.get(
            "lifetime_buckets",
            _catalogue.LIFETIME_BUCKETS,
            _buckets_from_env,
            _check_buckets,
            "strictly increasing positive finite seconds, e.g. '1,60,3600'",
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
    )
