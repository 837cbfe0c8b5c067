"""The demo's traces: each worker call is a span, so poolwatch's pool waits have a parent.

``OTEL_TRACES_EXPORTER`` chooses, as for any OpenTelemetry application:

* unset or ``none`` — no tracing (poolwatch's spans go to the no-op global provider);
* ``otlp`` — OTLP to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``
  (HTTP/protobuf, or gRPC through ``OTEL_EXPORTER_OTLP_PROTOCOL``): the compose stack's
  Jaeger shows them;
* ``console`` — one line on stderr per ``pool.wait`` and ``pool.connect`` span (the
  workers' own spans, one per call, would drown them).

The provider is the demo's own, given to ``instrument(tracer_provider=)``: poolwatch never
sets the global one, and neither does its demo.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from poolwatch._tracing import SPAN_CONNECT, SPAN_WAIT

EXPORTERS = ("none", "otlp", "console")


class DemoTracingError(ValueError):
    """``OTEL_TRACES_EXPORTER`` names an exporter the demo cannot use."""


def tracer_provider(environ: Mapping[str, str], err: TextIO = sys.stderr) -> TracerProvider | None:
    """The provider ``OTEL_TRACES_EXPORTER`` asks for, or None for no tracing."""
    choice = environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower() or "none"
    if choice not in EXPORTERS:
        raise DemoTracingError(
            f"OTEL_TRACES_EXPORTER got {choice!r}: the demo takes one of {', '.join(EXPORTERS)}"
        )
    if choice == "none":
        return None
    provider = TracerProvider(resource=Resource.create())
    if choice == "console":
        provider.add_span_processor(SimpleSpanProcessor(PoolSpanLines(err)))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(environ)))
    return provider


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip()
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError as error:
        raise DemoTracingError(
            "OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'poolwatch[otlp]'"
        ) from error
    exporter: SpanExporter = OTLPSpanExporter()
    return exporter


class PoolSpanLines(SpanExporter):
    """Writes poolwatch's spans, one line each: name, pool, duration, outcome, trace id."""

    def __init__(self, out: TextIO) -> None:
        self._out = out

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            if span.name not in (SPAN_WAIT, SPAN_CONNECT) or span.context is None:
                continue
            self._out.write(line(span) + "\n")
        self._out.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def line(span: ReadableSpan) -> str:
    """``pool.wait 'orders-db' 412.0ms outcome=timeout trace=… parent=…``."""
    attributes: Mapping[str, Any] = span.attributes or {}
    seconds = ((span.end_time or 0) - (span.start_time or 0)) / 1e9
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else "-"
    trace_id = span.context.trace_id if span.context is not None else 0
    return (
        f"{span.name} {attributes.get('pool.name', '?')!r} {seconds * 1000:.1f}ms "
        f"outcome={attributes.get('outcome', '?')} trace={trace_id:032x} parent={parent}"
    )
