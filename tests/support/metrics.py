"""Reading exported metrics back in tests: exact values by metric name and attributes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
)


@dataclass
class Collected:
    """One collection from a reader, with lookups by name and attributes."""

    metrics: dict[str, Metric]

    def names(self) -> set[str]:
        return set(self.metrics)

    def points(self, name: str, **attrs: Any) -> list[Any]:
        metric = self.metrics.get(name)
        if metric is None:
            return []
        wanted = {k.replace("__", "."): v for k, v in attrs.items()}
        return [
            p
            for p in metric.data.data_points
            if all(p.attributes.get(k) == v for k, v in wanted.items())
        ]

    def value(self, name: str, **attrs: Any) -> int | float:
        """The single sum point matching ``attrs`` (``pool__name`` stands for pool.name)."""
        points = self.points(name, **attrs)
        assert len(points) == 1, f"{name} {attrs}: expected one point, got {points}"
        point = points[0]
        assert isinstance(point, NumberDataPoint)
        return point.value

    def histogram(self, name: str, **attrs: Any) -> HistogramDataPoint:
        points = self.points(name, **attrs)
        assert len(points) == 1, f"{name} {attrs}: expected one point, got {points}"
        point = points[0]
        assert isinstance(point, HistogramDataPoint)
        return point

    def count(self, name: str, **attrs: Any) -> int:
        """Observations in the histogram matching ``attrs``; 0 when it was never exported
        (optional points, such as waits that timed out, appear from their first one)."""
        points = self.points(name, **attrs)
        assert len(points) <= 1, f"{name} {attrs}: expected at most one point, got {points}"
        return points[0].count if points else 0


def collect(reader: InMemoryMetricReader) -> Collected:
    """Collect now and index the poolwatch scope's metrics by name."""
    data = reader.get_metrics_data()
    found: dict[str, Metric] = {}
    if data is not None:
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                if scope_metrics.scope.name == "poolwatch":
                    for metric in scope_metrics.metrics:
                        found[metric.name] = metric
    return Collected(found)
