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

The provider is made with ``shutdown_on_exit=False``: the SDK's own exit handler waits for
its readers' last export as long as the exporter retries (10 s and more against a collector
that is down), so poolwatch stops it itself, within ``shutdown_timeout``
(:meth:`OwnedProvider.shutdown`), at ``uninstrument()`` and at exit.
"""

from __future__ import annotations

import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

from poolwatch._config import ConfigError, Settings, shown

DEFAULT_PROMETHEUS_PORT = 9464
_EXPORTERS = ("otlp", "prometheus", "console", "none")


@dataclass
class OwnedProvider:
    """A provider poolwatch made, and what must be stopped with it."""

    provider: MeterProvider
    prometheus_address: tuple[str, int] | None = None
    _server: Any = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def abandon_in_child(self) -> None:
        """In a forked child: let go of the parent's provider without stopping anything.

        The endpoint's listening socket is the parent's (its serving thread did not survive
        the fork): the child closes only its own copy. The readers are left alone — a
        shutdown would flush them, exporting as the parent.
        """
        if self._server is not None:
            self._server.socket.close()
            self._server = None

    def shutdown(self, timeout: float) -> tuple[bool, BaseException | None]:
        """Stop the endpoint and the provider's readers, their last export included, waiting
        at most ``timeout`` seconds.

        Returns whether it all finished in time, and the error it raised, if any. What has
        not finished goes on in a daemon thread: a reader's last export to a collector that
        is down or never answers is left to its own timeout and retries, which end with the
        process if they have not ended before.
        """
        if self._stopped:  # uninstrument() first, then exit: once is enough
            return True, None
        self._stopped = True
        server, self._server = self._server, None
        provider = self.provider
        deadline = time.monotonic() + timeout
        gave_up: list[bool] = []

        def stop() -> None:
            try:
                if server is not None:
                    server.shutdown()  # its serving loop notices within 0.5 s
                    server.server_close()
            finally:
                provider.shutdown(timeout_millis=max(deadline - time.monotonic(), 0.0) * 1000)
                # The SDK returns at its deadline whether its readers finished or not.
                gave_up.append(time.monotonic() >= deadline)

        finished, error = bounded(stop, timeout, "poolwatch-shutdown")
        return finished and gave_up == [False], error


def bounded(
    task: Callable[[], object], timeout: float, name: str
) -> tuple[bool, BaseException | None]:
    """Run ``task`` on a daemon thread and wait for it at most ``timeout`` seconds.

    Returns whether it finished in time, and what it raised (never raised here). Where no
    thread can be started (an interpreter that is finalizing), ``task`` runs here instead,
    relying on its own deadlines.
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            task()
        except BaseException as error:  # handed to the caller, never raised in the thread
            outcome.append(error)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name=name, daemon=True)
    try:
        thread.start()
    except RuntimeError:  # "can't create new thread at interpreter shutdown"
        run()
    else:
        thread.join(timeout)
    if not outcome:
        return False, None
    return True, outcome[0]


class _Reader(PeriodicExportingMetricReader):
    """The SDK's periodic reader, except in a forked child, where it stays stopped.

    The SDK restarts a periodic reader's thread in every forked child. poolwatch gives a
    forked child a provider of its own (or, to a child forked to exec, none), so the
    parent's reader would only collect an empty provider there — and in a child forked by
    ``subprocess`` for a ``preexec_fn``, it started a thread just before ``exec``.
    """

    def _at_fork_reinit(self) -> None:
        return None


class _Provider(MeterProvider):
    """The SDK's MeterProvider, except that a forked child does not detect its resource again.

    The SDK's fork handler runs the process-dependent resource detectors, on a thread pool,
    in every forked child: about 2 ms of CPU time a spawn with a ``preexec_fn``, measured
    (benchmarks/bench_spawn.py), spent on a provider the child never uses — poolwatch gives
    a forked child one of its own, named by :func:`child_resource`, when it needs one. The
    locks are made new as the SDK does.
    """

    def _handle_fork(self) -> None:
        self._lock = threading.Lock()
        self._meter_lock = threading.Lock()
        MeterProvider._all_metric_readers_lock = threading.Lock()


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
                f"poolwatch: environment variable OTEL_METRICS_EXPORTER got {shown(raw)}: "
                f"expected a comma-separated list of {', '.join(_EXPORTERS)}"
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


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    """The OTLP metric exporter class the environment's protocol asks for."""
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
                f"{shown(protocol)}: expected 'grpc' or 'http/protobuf'"
            )
    except ImportError:
        raise ConfigError(
            f"poolwatch: OTLP export ({protocol}) needs the OTLP exporter: "
            "pip install 'poolwatch[otlp]'"
        ) from None
    return OTLPMetricExporter


def _otlp_reader(environ: Mapping[str, str]) -> MetricReader:
    return _Reader(_otlp_exporter(environ)())


def _prometheus_port(settings: Settings, environ: Mapping[str, str]) -> int:
    """The endpoint's port: the setting, else ``OTEL_EXPORTER_PROMETHEUS_PORT``, else 9464."""
    if settings.prometheus_port is not None:
        return settings.prometheus_port
    env_port = environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", str(DEFAULT_PROMETHEUS_PORT))
    try:
        port = int(env_port)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"poolwatch: environment variable OTEL_EXPORTER_PROMETHEUS_PORT got "
            f"{shown(env_port)}: expected a TCP port 0-65535"
        )
    return port


def _prometheus_modules() -> None:
    try:
        import opentelemetry.exporter.prometheus  # noqa: F401
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            "poolwatch: a Prometheus endpoint needs the Prometheus exporter: "
            "pip install 'poolwatch[prometheus]'"
        ) from None


def check(settings: Settings, environ: Mapping[str, str]) -> None:
    """Raise the ConfigError :func:`build` would, without building anything (``poolwatch
    run`` checks before the program starts; a port in use is found only by binding)."""
    for name in _exporters(settings, environ):
        if name == "otlp":
            _otlp_exporter(environ)
        elif name == "prometheus":
            _prometheus_modules()
            _prometheus_port(settings, environ)


def _prometheus(settings: Settings, environ: Mapping[str, str]) -> tuple[MetricReader, Any]:
    _prometheus_modules()
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, start_http_server

    from poolwatch._prometheus import attach_to

    port = _prometheus_port(settings, environ)
    registry = CollectorRegistry(auto_describe=True)
    reader = PrometheusMetricReader(registry=registry)
    attach_to(reader)  # exemplars on poolwatch's buckets (OpenMetrics)
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
                readers.append(_Reader(ConsoleMetricExporter()))
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
    provider = _Provider(
        metric_readers=readers, resource=resource or _resource(), shutdown_on_exit=False
    )
    owned = OwnedProvider(provider)
    if server is not None:
        owned._server = server
        host, port = server.server_address[:2]
        owned.prometheus_address = (str(host), int(port))
    return owned
