"""poolwatch instrumented into a provider of the test's own, and what it exported."""

from __future__ import annotations

import gc

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import poolwatch
from tests.support.metrics import Collected, collect


class Harness:
    """poolwatch instrumented into a fresh MeterProvider with an in-memory reader."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        self.handle: poolwatch.Instrumentation | None = None

    def instrument(self, **settings: object) -> poolwatch.Instrumentation:
        gc.collect()  # engines of earlier tests awaiting collection would be found too
        # The process view's points come from poolwatch's thread on its own schedule; tests
        # that pin what a collection holds would depend on it: they get it when they ask
        # (tests/test_process.py).
        settings.setdefault("process_view", "off")
        self.handle = poolwatch.instrument(meter_provider=self.provider, **settings)
        return self.handle

    def collect(self) -> Collected:
        return collect(self.reader)
