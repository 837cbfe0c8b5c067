"""poolwatch as an OpenTelemetry instrumentor, for ``opentelemetry-instrument``.

The package declares it under the ``opentelemetry_instrumentor`` entry-point group, so
``opentelemetry-instrument python app.py`` starts poolwatch like any contrib
instrumentation, after the distro has configured the SDK (poolwatch then feeds that global
MeterProvider). Settings come from ``POOLWATCH_*``. This module is only imported by that
machinery: it needs the ``opentelemetry-instrumentation`` package, which poolwatch itself
does not.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

import poolwatch


class PoolwatchInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """``instrument()`` / ``uninstrument()`` through OpenTelemetry's instrumentor interface."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # each adapter hooks its library when the application imports it

    def _instrument(self, **kwargs: Any) -> None:
        settings = {}
        if kwargs.get("meter_provider") is not None:
            settings["meter_provider"] = kwargs["meter_provider"]
        poolwatch.instrument(**settings)

    def _uninstrument(self, **kwargs: Any) -> None:
        poolwatch.uninstrument()
