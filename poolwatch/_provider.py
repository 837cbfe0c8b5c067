"""A MeterProvider of poolwatch's own, set up from the environment, when the app has none.

Chosen in this order by ``instrument()``:

1. the ``meter_provider=`` argument;
2. the global MeterProvider, if the application set an SDK one (and no Prometheus port
   was asked of poolwatch);
3. this module: readers from ``OTEL_METRICS_EXPORTER`` (``otlp``, ``prometheus``,
   ``console``, ``none``; comma-separated) or, when that is unset, OTLP if an
   ``OTEL_EXPORTER_OTLP_*ENDPOINT`` is set and Prometheus if a port was given. The
   provider is not made global: poolwatch never takes that decision from the application.

The Prometheus endpoint binds to 127.0.0.1 unless ``prometheus_host`` says otherwise.
"""

from __future__ import annotations

import os
import platform
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from poolwatch._config import ConfigError, Settings

DEFAULT_PROMETHEUS_PORT = 9464
_EXPORTERS = ("otlp", "prometheus", "console", "none")


@dataclass
class OwnedProvider:
    """A provider poolwatch made, and what must be stopped with it."""

    provider: MeterProvider
    prometheus_address: tuple[str, int] | None = None
    _server: Any = field(default=None, repr=False)

    def abandon_in_child(self) -> None:
        """In a forked child: let go of the parent's provider without stopping anything.

        The endpoint's listening socket is the parent's (its serving thread did not survive
        the fork): the child closes only its own copy. The readers are left alone — a
        shutdown would flush them, exporting as the parent.
        """
        if self._server is not None:
            self._server.socket.close()
            self._server = None

    def shutdown(self) -> None:
        """Stop the endpoint and the provider's readers."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.provider.shutdown()


def child_resource(parent: Resource) -> Resource:
    """The parent's resource, naming the forked child: its own instance id and pid."""
    return parent.merge(
        Resource({"service.instance.id": str(uuid.uuid4()), "process.pid": os.getpid()})
    )


def _resource() -> Resource:
    return Resource.create(
        {
            "service.instance.id": str(uuid.uuid4()),
            "process.pid": os.getpid(),
            "process.runtime.name": platform.python_implementation().lower(),
            "process.runtime.version": platform.python_version(),
            "host.name": socket.gethostname(),
        }
    )


def _exporters(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_METRICS_EXPORTER")
    if raw is not None:
        chosen = [part.strip().lower() for part in raw.split(",") if part.strip()]
        bad = [name for name in chosen if name not in _EXPORTERS]
        if bad:
            raise ConfigError(
                f"poolwatch: environment variable OTEL_METRICS_EXPORTER got {raw!r}: expected a "
                f"comma-separated list of {', '.join(_EXPORTERS)}"
            )
        if settings.prometheus_port is not None and "prometheus" not in chosen:
            chosen.append("prometheus")
        return [name for name in chosen if name != "none"]
    chosen = []
    if any(
        environ.get(var)
        for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    ):
        chosen.append("otlp")
    if settings.prometheus_port is not None:
        chosen.append("prometheus")
    return chosen


def _otlp_reader(environ: Mapping[str, str]) -> MetricReader:
    protocol = (
        environ.get(
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
        ).strip()
        or "http/protobuf"
    )
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
                OTLPMetricExporter,
            )
        else:
            raise ConfigError(
                f"poolwatch: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL/OTEL_EXPORTER_OTLP_PROTOCOL got "
                f"{protocol!r}: expected 'grpc' or 'http/protobuf'"
            )
    except ImportError:
        raise ConfigError(
            f"poolwatch: OTLP export ({protocol}) needs the OTLP exporter: "
            "pip install 'poolwatch[otlp]'"
        ) from None
    return PeriodicExportingMetricReader(OTLPMetricExporter())


def _prometheus(settings: Settings, environ: Mapping[str, str]) -> tuple[MetricReader, Any]:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError(
            "poolwatch: a Prometheus endpoint needs the Prometheus exporter: "
            "pip install 'poolwatch[prometheus]'"
        ) from None
    port = settings.prometheus_port
    if port is None:
        env_port = environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", str(DEFAULT_PROMETHEUS_PORT))
        try:
            port = int(env_port)
        except ValueError:
            raise ConfigError(
                f"poolwatch: environment variable OTEL_EXPORTER_PROMETHEUS_PORT got {env_port!r}: "
                "expected a TCP port 0-65535"
            ) from None
    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    try:
        server, _thread = start_http_server(port, addr=settings.prometheus_host, registry=registry)
    except OSError as error:
        reader.shutdown()
        raise ConfigError(
            f"poolwatch setting 'prometheus_port' got {port}: cannot listen on "
            f"{settings.prometheus_host}:{port} ({error.strerror or error})"
        ) from None
    return reader, server


def build(
    settings: Settings,
    environ: Mapping[str, str],
    *,
    prometheus: bool = True,
    resource: Resource | None = None,
) -> OwnedProvider:
    """A MeterProvider with the readers the environment and settings ask for.

    ``prometheus=False`` leaves the Prometheus endpoint out, and ``resource`` replaces the
    detected one: a forked child, whose port is the parent's and which must not run the
    resource detectors from a fork handler (they use a thread pool whose lock the fork
    holds until a later handler releases it).
    """
    readers: list[MetricReader] = []
    server = None
    try:
        for name in _exporters(settings, environ):
            if name == "prometheus" and not prometheus:
                continue
            if name == "otlp":
                readers.append(_otlp_reader(environ))
            elif name == "console":
                readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
            elif name == "prometheus" and server is None:
                reader, server = _prometheus(settings, environ)
                readers.append(reader)
    except BaseException:
        if server is not None:
            server.shutdown()
            server.server_close()
        for reader in readers:
            reader.shutdown()
        raise
    owned = OwnedProvider(MeterProvider(metric_readers=readers, resource=resource or _resource()))
    if server is not None:
        owned._server = server
        host, port = server.server_address[:2]
        owned.prometheus_address = (str(host), int(port))
    return owned
