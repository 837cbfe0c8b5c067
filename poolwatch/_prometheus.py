"""Exemplars on poolwatch's own Prometheus endpoint.

OpenTelemetry's Prometheus exporter turns data points into prometheus_client metric families
and drops their exemplars. prometheus_client itself writes exemplars — in the OpenMetrics
format, which Prometheus asks for when its exemplar storage is on — when a bucket sample
carries one. So, on the endpoint poolwatch serves (its own provider's reader, never an
application's), the exemplars of poolwatch's wait and connect histograms are kept as the
reader receives the points, and attached to the matching ``_bucket`` samples as the families
are written: prometheus_client writes the exposition, poolwatch adds no format of its own.

It leans on the exporter's collector object (``PrometheusMetricReader._collector``, private):
if a release renames it, the endpoint serves what it did before, without exemplars, and one
WARNING says so. Exemplars also travel over OTLP (Collector → Prometheus) with no such
reliance. Failures here are logged once and never stop the endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.samples import Exemplar, Sample

from poolwatch import _catalogue as c
from poolwatch._safe import logger

_WITH_EXEMPLARS = {
    c.WAIT_DURATION.name: "poolwatch_wait_duration_seconds",
    c.CONNECT_DURATION.name: "poolwatch_connect_duration_seconds",
}
"""poolwatch's histograms that carry exemplars, by OpenTelemetry name: Prometheus family."""

Key = tuple[str, frozenset[tuple[str, str]]]
"""(Prometheus family, the point's attributes as Prometheus labels)."""


def _labels(attributes: Any) -> frozenset[tuple[str, str]]:
    return frozenset((str(k).replace(".", "_"), str(v)) for k, v in dict(attributes).items())


def _bound(text: str) -> float:
    return math.inf if text == "+Inf" else float(text)


class Exemplars:
    """Keeps the exemplars of the points a reader receives, and puts them on the samples."""

    def __init__(self) -> None:
        self._kept: dict[Key, list[tuple[float, Any]]] = {}

    def keep(self, metrics_data: Any) -> None:
        """Remember the exemplars of poolwatch's histogram points in ``metrics_data``."""
        kept: dict[Key, list[tuple[float, Any]]] = {}
        for resource in metrics_data.resource_metrics:
            for scope in resource.scope_metrics:
                if scope.scope.name != c.SCOPE_NAME:
                    continue
                for metric in scope.metrics:
                    family = _WITH_EXEMPLARS.get(metric.name)
                    if family is None:
                        continue
                    for point in metric.data.data_points:
                        if point.exemplars:
                            key = (family, _labels(point.attributes))
                            kept[key] = [(e.value, e) for e in point.exemplars]
        self._kept = kept

    def attach(self, families: list[Any]) -> None:
        """Put the exemplars kept on the ``_bucket`` samples of ``families`` (as
        prometheus_client yields them): each on the bucket whose range holds its value."""
        if not self._kept:
            return
        for family in families:
            if family.name in _WITH_EXEMPLARS.values():
                family.samples = self._with_exemplars(family.name, family.samples)

    def _with_exemplars(self, family: str, samples: list[Sample]) -> list[Sample]:
        out = []
        below: dict[frozenset[tuple[str, str]], float] = {}  # a point's previous bound
        for sample in samples:
            labels = dict(sample.labels)
            le = labels.pop("le", None)
            if not sample.name.endswith("_bucket") or le is None:
                out.append(sample)
                continue
            point = frozenset((k, v) for k, v in labels.items() if not k.startswith("otel_scope_"))
            upper, lower = _bound(le), below.get(point, -math.inf)
            below[point] = upper
            chosen = next(
                (e for value, e in self._kept.get((family, point), ()) if lower < value <= upper),
                None,
            )
            if chosen is None or sample.exemplar is not None:
                out.append(sample)
                continue
            ids = {
                "trace_id": format(chosen.trace_id, "032x"),
                "span_id": format(chosen.span_id, "016x"),
            }
            exemplar = Exemplar(ids, chosen.value, chosen.time_unix_nano / 1e9)
            out.append(sample._replace(exemplar=exemplar))
        return out


_warned: set[str] = set()


def _warn_once(what: str, error: BaseException) -> None:
    if what not in _warned:
        _warned.add(what)
        logger.warning(
            "poolwatch: the Prometheus endpoint serves no exemplars (%s): %s: %s",
            what,
            type(error).__name__,
            error,
        )


def attach_to(reader: Any) -> None:
    """Make the Prometheus ``reader`` (poolwatch's own) write exemplars on poolwatch's
    buckets; if its collector cannot be found, the endpoint stays as it was."""
    collector = getattr(reader, "_collector", None)
    add: Callable[[Any], None] | None = getattr(collector, "add_metrics_data", None)
    collect: Callable[[], Iterable[Any]] | None = getattr(collector, "collect", None)
    if collector is None or add is None or collect is None:
        _warn_once("no exporter collector to extend", RuntimeError(type(reader).__name__))
        return
    exemplars = Exemplars()

    def add_metrics_data(metrics_data: Any) -> None:
        try:
            exemplars.keep(metrics_data)
        except Exception as error:
            _warn_once("reading exemplars", error)
        add(metrics_data)

    def collect_with_exemplars() -> Iterator[Any]:
        families = list(collect())
        try:
            exemplars.attach(families)
        except Exception as error:  # the families as the exporter made them, then
            _warn_once("writing exemplars", error)
        yield from families

    collector.add_metrics_data = add_metrics_data
    collector.collect = collect_with_exemplars
