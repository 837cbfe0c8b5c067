"""poolwatch: connection-pool observability for Python services, through OpenTelemetry.

Call :func:`instrument` once at start-up. Every connection pool of the libraries poolwatch
knows is hooked, whether created before or after, and exported through OpenTelemetry as
the ``poolwatch.*`` metric family: connections used and idle against the limit, callers
waiting, time to get a connection, time to open one, how long connections are held,
timeouts, connections closed and why, and leaks.
"""

from poolwatch._api import (
    Instrumentation,
    instrument,
    pools,
    process_view,
    track,
    uninstrument,
)
from poolwatch._config import ConfigError
from poolwatch._models import Antipattern, PoolSnapshot, Sizing
from poolwatch._version import __version__
from poolwatch.diagnostics.process import ProcessConnections, ProcessView

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
