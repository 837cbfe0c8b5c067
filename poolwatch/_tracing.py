"""Pool waits in traces: a span for each wait that really waited, recorded after the fact.

A request that waited 4 s for a pooled connection shows in a trace as a 4-second gap before
its query: nothing says the pool was starved. poolwatch fills the gap. When a caller waited
longer than ``wait_span_threshold`` for a connection (or gave up), a ``pool.wait`` span is
recorded as a child of the caller's active span, from the moment it asked to the moment it
got a connection or gave up; when a new connection was opened inside that wait, a
``pool.connect`` span is its child. A connect that is not part of a wait (urllib3 and httpx
open the connection after it) and takes longer than the threshold gets a ``pool.connect``
span of its own. The span's ids become exemplars of the ``wait.duration`` and
``connect.duration`` histograms (``Ledger._keep_exemplar``), linking a point on a dashboard
to the trace.

The spans are made once the wait is over, with explicit start and end times, on the caller's
thread and in its context (so in its task, under asyncio): a wait shorter than the threshold
costs one comparison and nothing else. Spans go to the tracer provider given
(``tracer_provider=``) or the global one; with no SDK provider configured the global one
records nothing, and neither does poolwatch.

Attributes: ``pool.name``, ``pool.kind``, ``server.address`` and ``server.port`` (when the
pool has one server), ``outcome`` (``acquired``, ``timeout``, ``error``; for a connect
``ok``, ``error``). A wait that ended in a timeout or an error has status ``ERROR``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, TracerProvider

from poolwatch import _catalogue as c
from poolwatch._ledger import ConnectRecord, SpanIds
from poolwatch._version import __version__

SPAN_WAIT: Final = "pool.wait"
"""The span of a caller's wait for a pooled connection."""
SPAN_CONNECT: Final = "pool.connect"
"""The span of a new connection's opening (a child of the wait it is part of, if any)."""


class Tracing:
    """Records poolwatch's spans on one tracer (``Ledger.tracer``)."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def wait(
        self,
        attributes: Mapping[str, str | int],
        start: float,
        end: float,
        outcome: str,
        connect: ConnectRecord | None,
    ) -> tuple[SpanIds, SpanIds | None] | None:
        """See ``_ledger.WaitTracer.wait``."""
        clock = _Clock(_started(trace.get_current_span()))
        span = self._tracer.start_span(
            SPAN_WAIT,
            kind=SpanKind.INTERNAL,
            attributes={**attributes, c.OUTCOME: outcome},
            start_time=clock.ns(start),
        )
        clock.floor = _started(span)  # its connect child starts within it
        if outcome != c.OUTCOME_ACQUIRED:
            span.set_status(Status(StatusCode.ERROR, f"no connection: {outcome}"))
        connect_ids = None
        if connect is not None:
            connect_ids = self._connect(attributes, connect, clock, trace.set_span_in_context(span))
        span.end(end_time=clock.ns(end))
        ids = _ids(span)
        return (ids, connect_ids) if ids is not None else None

    def connect(
        self, attributes: Mapping[str, str | int], start: float, end: float, ok: bool
    ) -> SpanIds | None:
        """See ``_ledger.WaitTracer.connect``."""
        clock = _Clock(_started(trace.get_current_span()))
        return self._connect(attributes, (start, end, ok), clock, None)

    def _connect(
        self,
        attributes: Mapping[str, str | int],
        connect: ConnectRecord,
        clock: _Clock,
        context: Any,
    ) -> SpanIds | None:
        start, end, ok = connect
        outcome = c.CONNECT_OK if ok else c.CONNECT_ERROR
        span = self._tracer.start_span(
            SPAN_CONNECT,
            context=context,
            kind=SpanKind.INTERNAL,
            attributes={**attributes, c.OUTCOME: outcome},
            start_time=clock.ns(start),
        )
        if not ok:
            span.set_status(Status(StatusCode.ERROR, "connect failed"))
        span.end(end_time=clock.ns(end))
        return _ids(span)


class _Clock:
    """``perf_counter()`` times as the wall clock's nanoseconds, read once per span.

    The two clocks are not the same (NTP slews the wall clock, not ``perf_counter()``), so a
    converted time can fall a few microseconds before the parent span began, a start the
    SDK stamped from the wall clock itself. A child never starts before its parent: times
    are clamped to the parent's start (``floor``).
    """

    __slots__ = ("_now", "_now_ns", "floor")

    def __init__(self, floor: int = 0) -> None:
        self._now_ns = time.time_ns()
        self._now = time.perf_counter()
        self.floor = floor

    def ns(self, moment: float) -> int:
        return max(self.floor, self._now_ns - int((self._now - moment) * 1e9))


def _started(span: Any) -> int:
    """When an SDK span started (ns), 0 for a span that does not say (a non-recording one)."""
    start = getattr(span, "start_time", None)
    return start if isinstance(start, int) else 0


def _ids(span: Any) -> SpanIds | None:
    """A sampled span's (trace id, span id); None for one no SDK records (no provider, or
    sampled out)."""
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return (context.trace_id, context.span_id)


def tracing_for(provider: TracerProvider | None) -> Tracing:
    """The tracer of ``provider``, else of the global provider (which records nothing until
    the application sets an SDK one, and follows it when it does)."""
    source = provider if provider is not None else trace.get_tracer_provider()
    return Tracing(source.get_tracer(c.SCOPE_NAME, __version__))
