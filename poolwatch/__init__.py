"""poolwatch: connection-pool observability for Python services, through OpenTelemetry.

Call :func:`instrument` once at start-up. Every connection pool of the libraries poolwatch
knows is hooked, whether created before or after, and exported through OpenTelemetry as
the ``poolwatch.*`` metric family: connections used and idle against the limit, callers
waiting, time to get a connection, time to open one, how long connections are held,
timeouts, connections closed and why, and leaks.

The functions and ``Instrumentation`` are loaded on first use: importing ``poolwatch``
(the ``poolwatch`` command does, for ``top`` and ``doctor``) loads no OpenTelemetry SDK.
"""

import importlib
import typing

from poolwatch._config import ConfigError
from poolwatch._models import Antipattern, PoolSnapshot, Sizing
from poolwatch._version import __version__
from poolwatch.diagnostics.process import ProcessConnections, ProcessView

if typing.TYPE_CHECKING:
    from poolwatch._api import (
        Instrumentation,
        instrument,
        pools,
        process_view,
        track,
        uninstrument,
    )

__all__ = [
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

_FROM_API = ("Instrumentation", "instrument", "pools", "process_view", "track", "uninstrument")


def __getattr__(name: str) -> typing.Any:
    """Load the OpenTelemetry side (``_api``) at the first use of one of its names."""
    if name not in _FROM_API:
        raise AttributeError(f"module 'poolwatch' has no attribute {name!r}")
    api = importlib.import_module("poolwatch._api")
    for exported in _FROM_API:
        globals()[exported] = getattr(api, exported)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
