"""``instrument()``, ``uninstrument()``, ``track()``, ``pools()``: idempotent and reversible."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Mapping
from types import FrameType, ModuleType, TracebackType
from typing import Any

from opentelemetry import metrics as otel_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from poolwatch import _versions
from poolwatch._collect import Collector
from poolwatch._config import ConfigError, Settings, psutil_importable, resolve, shown
from poolwatch._export import Bridge, Producer
from poolwatch._imports import PostImportHooks, installed
from poolwatch._janitor import Janitor
from poolwatch._models import PoolSnapshot
from poolwatch._naming import MAX_NAME, check_pool_name
from poolwatch._provider import OwnedProvider, build, child_resource
from poolwatch._registry import Registry
from poolwatch._safe import ErrorLog, logger
from poolwatch._tracing import tracing_for
from poolwatch.adapters import ADAPTERS, Adapter
from poolwatch.diagnostics.process import REFRESH_EVERY, ProcessView, ProcessWatcher

_lock = threading.RLock()
_current: Instrumentation | None = None


class Instrumentation:
    """The handle ``instrument()`` returns: what is hooked, and how to undo it."""

    def __init__(
        self,
        settings: Settings,
        provider: MeterProvider,
        owned: OwnedProvider | None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.meter_provider = provider
        self._owned = owned
        self._errors = ErrorLog()
        tracing = tracing_for(tracer_provider) if settings.wait_span_threshold else None
        self._registry = Registry(settings, self._errors, tracing)
        # A forked child's first new pool completes its set-up (see Fork).
        self._registry.on_track = self._ensure_set_up
        self._collector = Collector(self._registry, settings, self._errors)
        self._producer = Producer(self._collector, settings, self._errors)
        self._bridge = Bridge(self._producer, provider, self._errors)
        self._hooks = PostImportHooks()
        self._janitor = Janitor(self._registry.ledgers, self._errors)
        self._process = _process_watcher(settings, self._registry, self._errors)
        if self._process is not None:
            self._producer.process = self._process
            self._janitor.every(REFRESH_EVERY, self._process.refresh)
        self._active: dict[str, Adapter] = {}
        self._stopped = False
        self._child_pending = False
        """A child forked to exec: its set-up is left until something asks for it."""

    @property
    def prometheus_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the Prometheus endpoint poolwatch serves, if any."""
        return self._owned.prometheus_address if self._owned else None

    @property
    def libraries(self) -> tuple[str, ...]:
        """Libraries hooked now (a library is hooked once the application imports it)."""
        return tuple(self._active)

    @property
    def errors(self) -> dict[str, int]:
        """Internal failures so far, by place; each was logged once and never raised."""
        return self._errors.counts

    def _start(self) -> None:
        self._bridge.attach()
        self._janitor.start()
        for library in self.settings.libraries:
            adapter = ADAPTERS[library](self._registry)
            if adapter.module in sys.modules:
                self._activate(adapter, imported_before=True)
            elif installed(adapter.module):
                self._hooks.watch(adapter.module, self._on_import(adapter))

    def _on_import(self, adapter: Adapter) -> Any:
        def hook(_module: ModuleType) -> None:
            with _lock:
                if not self._stopped:
                    self._activate(adapter, imported_before=False)

        return hook

    def _activate(self, adapter: Adapter, *, imported_before: bool) -> None:
        if not _supported(adapter, self._errors):
            return
        try:
            adapter.instrument(imported_before=imported_before)
        except Exception as error:
            self._errors.report(f"{adapter.name} instrument", error)
            try:
                adapter.uninstrument()
            except Exception as undo_error:
                self._errors.report(f"{adapter.name} uninstrument", undo_error)
            return
        self._active[adapter.name] = adapter

    def track(self, obj: Any, name: str | None = None) -> None:
        """Track ``obj``'s pools, under ``name`` if given; see :func:`poolwatch.track`."""
        self._ensure_set_up()
        if name is not None:
            try:
                check_pool_name(name)
            except ValueError:
                raise ConfigError(
                    f"poolwatch.track() got name {shown(name)}: expected 1-{MAX_NAME} printable "
                    "ASCII characters without credentials or a query string"
                ) from None
        with _lock:
            for adapter in self._active.values():
                if adapter.track(obj, name):
                    return
        hooked = ", ".join(self._active) or "none yet"
        raise TypeError(
            f"poolwatch.track() got {type(obj).__module__}.{type(obj).__qualname__}: expected an "
            f"engine, client or pool of a hooked library (hooked: {hooked})"
        )

    def pools(self) -> list[PoolSnapshot]:
        """A snapshot of every pool series, sorted by kind and name.

        A series whose pools are all gone is shown, with nothing open, for
        ``_registry.RETENTION`` seconds (its counters continue if a pool joins it again).
        """
        self._ensure_set_up()
        return self._collector.snapshots()

    def process_view(self) -> ProcessView | None:
        """The process's file descriptors and TCP connections, read now; see
        :func:`poolwatch.process_view`."""
        self._ensure_set_up()
        return self._process.refresh() if self._process is not None else None

    def uninstrument(self) -> None:
        """Undo ``instrument()``; see :func:`poolwatch.uninstrument`.

        Waits at most ``shutdown_timeout`` seconds in all (for poolwatch's thread, and for
        the last export of a provider poolwatch built). A provider the application gave,
        or its global one, is the application's: it is left running and never waited for.
        """
        global _current
        with _lock:
            if self._stopped:
                return
            self._stopped = True
            deadline = time.monotonic() + self.settings.shutdown_timeout
            self._janitor.stop(self.settings.shutdown_timeout)
            self._hooks.close()
            # The last export first, while the pools are still hooked and can be read: the
            # provider's periodic readers collect once more as they shut down. A reader
            # still busy at the deadline collects without poolwatch (detached below).
            self._stop_owned(deadline)
            self._bridge.detach()
            for adapter in self._active.values():
                try:
                    adapter.uninstrument()
                except Exception as error:
                    self._errors.report(f"{adapter.name} uninstrument", error)
                self._registry.untrack_adapter(adapter)
            self._active.clear()
            if _current is self:
                _current = None

    def _stop_owned(self, deadline: float) -> None:
        """Shut the provider poolwatch built down, giving up on it at ``deadline``."""
        owned = self._owned
        if owned is None:
            return
        if self._child_pending:  # the parent's, in a child forked to exec: not ours to stop
            owned.abandon_in_child()
            self._owned = None
            return
        left = max(deadline - time.monotonic(), 0.0)
        finished, error = owned.shutdown(left)
        if error is not None:
            self._errors.report("shutdown", error)
        if not finished and self.settings.shutdown_timeout > 0:  # 0: not waiting was asked
            logger.warning(
                "poolwatch: the exporters did not finish within shutdown_timeout (%g s); their "
                "last export is abandoned",
                self.settings.shutdown_timeout,
            )

    def _stop_at_exit(self) -> None:
        """At interpreter exit: the janitor and the last export, within ``shutdown_timeout``.

        The hooks stay: the application's own exit handlers may still use its pools. No
        lock is taken: a daemon thread may hold it for ever at exit.
        """
        if self._stopped:
            return
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self._janitor.stop(self.settings.shutdown_timeout)
        self._stop_owned(deadline)

    def _after_fork_in_child(self, *, exec_follows: bool) -> None:
        """In a forked child: start from zero, with a thread and a provider of its own.

        A child forked by ``subprocess`` to run a ``preexec_fn`` execs a new program right
        after it: it gets nothing now, and its set-up waits for a first pool, ``pools()``,
        ``track()`` or ``process_view()`` — that is, for ever (docs/architecture.md, Fork).
        """
        if exec_follows:
            self._child_pending = True
            return
        self._set_up_child()

    def _ensure_set_up(self) -> None:
        """Complete a forked child's set-up, if it was left for later."""
        if self._child_pending:
            with _lock:
                if self._child_pending:
                    self._set_up_child()

    def _set_up_child(self) -> None:
        self._child_pending = False
        self._registry.reset_after_fork()
        self._collector.reset_after_fork()
        self._producer.reset()
        if self._process is not None:
            self._process.reset()
        if not self._stopped:
            self._janitor.start()  # the parent's thread does not exist in the child
            if self._owned is not None:
                self._own_provider_in_child(self._owned)

    def _own_provider_in_child(self, parent: OwnedProvider) -> None:
        """A provider of the child's own: its resource names this process, not the parent.

        Without it a prefork server's workers would all export under the parent's
        ``service.instance.id`` and their counters would collide in the backend. The
        Prometheus endpoint stays with the parent (its port is taken): workers of a prefork
        server export over OTLP, or instrument after the fork with a port each.
        """
        self._bridge.detach()
        parent.abandon_in_child()
        try:
            resource = child_resource(parent.provider._sdk_config.resource)
            owned = build(self.settings, os.environ, prometheus=False, resource=resource)
        except Exception as error:
            self._errors.report("fork provider", error)
            self._owned = None
            return
        if parent.prometheus_address is not None:
            logger.warning(
                "poolwatch: forked process %d does not serve the parent's Prometheus endpoint "
                "(%s:%d); export over OTLP, or call instrument() in each worker with its own port",
                os.getpid(),
                *parent.prometheus_address,
            )
        self._owned = owned
        self.meter_provider = owned.provider
        self._bridge = Bridge(self._producer, owned.provider, self._errors)
        self._bridge.attach()

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstrument()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "active"
        return f"<poolwatch.Instrumentation {state} libraries={list(self.libraries)}>"


def _supported(adapter: Adapter, errors: ErrorLog) -> bool:
    """Whether the installed versions of what ``adapter`` hooks are in its supported ranges;
    if not, one WARNING names them and the adapter is not activated (``_versions.py``)."""
    try:
        outside = _versions.mismatches(adapter.requires)
        untested = _versions.mismatches(adapter.tested_with, only_installed=True)
    except Exception as error:  # an unreadable version: not hooking is the safe side
        errors.report(f"{adapter.name} version check", error)
        return False
    if outside:
        logger.warning(
            "poolwatch: %s is outside the versions poolwatch supports: its pools are not "
            "hooked (the application runs on unchanged)",
            "; ".join(str(m) for m in outside),
        )
        return False
    if untested:
        logger.warning(
            "poolwatch: %s is outside the versions poolwatch is tested with; its pools are "
            "still hooked through %s, but may be reported as pool.kind %s",
            "; ".join(str(m) for m in untested),
            adapter.name,
            adapter.kind,
        )
    return True


def _process_watcher(
    settings: Settings, registry: Registry, errors: ErrorLog
) -> ProcessWatcher | None:
    """The process view when it is on (``auto``: when psutil is installed)."""
    if settings.process_view == "off":
        return None
    if settings.process_view == "auto" and not psutil_importable():
        return None
    return ProcessWatcher(registry.pool_sockets, errors)


def _tracer_provider(arguments: Mapping[str, Any]) -> TracerProvider | None:
    """The ``tracer_provider=`` argument, checked; None: the global provider."""
    provider = arguments.get("tracer_provider")
    if provider is not None and not isinstance(provider, TracerProvider):
        raise ConfigError(
            f"poolwatch setting 'tracer_provider' (argument) got {type(provider).__name__}: "
            "expected an opentelemetry.trace.TracerProvider (an SDK one records spans)"
        )
    return provider


def _provider_for(
    arguments: Mapping[str, Any], settings: Settings, environ: Mapping[str, str]
) -> tuple[MeterProvider, OwnedProvider | None]:
    if "meter_provider" in arguments:
        provider = arguments["meter_provider"]
        if not isinstance(provider, MeterProvider):
            raise ConfigError(
                f"poolwatch setting 'meter_provider' (argument) got {type(provider).__name__}: "
                "expected an opentelemetry.sdk.metrics.MeterProvider"
            )
        if settings.prometheus_port is not None:
            raise ConfigError(
                "poolwatch setting 'prometheus_port' cannot be combined with 'meter_provider': "
                "add a PrometheusMetricReader to your MeterProvider instead"
            )
        return provider, None
    global_provider = otel_metrics.get_meter_provider()
    if settings.prometheus_port is None and isinstance(global_provider, MeterProvider):
        return global_provider, None
    owned = build(settings, environ)
    return owned.provider, owned


def instrument(**settings: Any) -> Instrumentation:
    """Hook every connection pool of the libraries poolwatch knows; see the package docs."""
    global _current
    with _lock:
        resolved = resolve(settings, os.environ, tuple(ADAPTERS))
        if _current is not None:
            if settings and resolved != _current.settings:
                logger.warning(
                    "poolwatch: instrument() called again with other settings; they are "
                    "ignored: call uninstrument() first to change them"
                )
            _current._ensure_set_up()
            return _current
        provider, owned = _provider_for(settings, resolved, os.environ)
        handle = Instrumentation(resolved, provider, owned, _tracer_provider(settings))
        try:
            handle._start()
        except BaseException:
            handle.uninstrument()
            raise
        _current = handle
        return handle


def uninstrument() -> None:
    """Restore every patched function, remove every listener, stop what poolwatch started."""
    with _lock:
        if _current is not None:
            _current.uninstrument()


def track(obj: Any, *, name: str | None = None) -> None:
    """Track ``obj`` (an engine, async engine or pool) explicitly, optionally naming it."""
    with _lock:
        if _current is None:
            raise RuntimeError("poolwatch.track() needs poolwatch.instrument() to be called first")
        _current.track(obj, name)


def pools() -> list[PoolSnapshot]:
    """Snapshots of every tracked pool series (empty when poolwatch is not instrumented)."""
    current = _current
    return current.pools() if current is not None else []


def process_view() -> ProcessView | None:
    """The process's open file descriptors against their limit and its TCP connections by
    state and owner, read now; None when poolwatch is not instrumented or the view is off
    (``process_view`` setting; it needs psutil: ``pip install 'poolwatch[process]'``)."""
    current = _current
    return current.process_view() if current is not None else None


def _at_exit() -> None:
    current = _current
    if current is not None:
        try:
            current._stop_at_exit()
        except Exception as error:  # never let exit fail because of poolwatch
            current._errors.report("exit", error)


atexit.register(_at_exit)


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.RLock()
    current = _current
    if current is not None:
        try:
            forker: FrameType | None = sys._getframe(1)
        except ValueError:  # forked from C with no Python frame: set up as a worker
            forker = None
        current._after_fork_in_child(exec_follows=_forked_to_exec(forker))


def _forked_to_exec(frame: FrameType | None) -> bool:
    """Whether the fork under way is ``subprocess``'s for a ``preexec_fn``.

    Fork handlers run in such a child only because a ``preexec_fn`` was given (without one,
    ``subprocess`` forks or spawns in C and runs none); the child then runs that function
    and execs. ``frame`` is the Python frame that forked: ``Popen._execute_child``.
    """
    return (
        frame is not None
        and frame.f_code.co_name == "_execute_child"
        and frame.f_globals.get("__name__") == "subprocess"
    )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
