"""Traces: what pool waits in traces cost a checkout that did not wait, and one that did.

poolwatch makes a ``pool.wait`` span only for a wait past ``wait_span_threshold``, after the
fact (docs/architecture.md, section 9). Two questions, each answered side by side in one
process, round by round in rotated order:

1. **A free checkout** (no wait: the common case) — one SQLAlchemy ``QueuePool``
   checkout+checkin over an SQLite file, inside an application span, for:

   * ``bare`` — no poolwatch;
   * ``poolwatch, spans off`` — ``wait_span_threshold=None``;
   * ``poolwatch, spans on`` — an SDK ``TracerProvider`` (a batch processor, an exporter
     that discards) given as ``tracer_provider=``, the default 1 ms threshold: the
     checkouts never wait, so tracing costs them one comparison;
   * ``a span per checkout`` — the alternative design, for scale: the same bare pool with
     the application's tracer starting and ending a span around each checkout, as a
     span-first design would on every checkout, free or not.

   "Added" is the median of per-round differences against ``bare``; the target is that
   ``spans on`` adds nothing measurable over ``spans off`` (their difference is printed
   with its 95% interval).

2. **A wait that waited** — ``Ledger.slow_wait`` for a 5 ms wait with a connect inside
   it: the ``pool.wait`` span, its ``pool.connect`` child, and the two exemplars kept.
   Paid only by callers that already waited longer than the threshold.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from _common import heading, interleave, median_interval, paired_differences, summarize, table
from bench_sqlalchemy import Bare, HotPathConfig, WithPoolwatch, cycle
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from poolwatch import _catalogue as c
from poolwatch._ledger import Ledger, _inner_connect
from poolwatch._tracing import tracing_for


@dataclass(frozen=True)
class TraceConfig:
    """How much to measure."""

    rounds: int = 21
    ops: int = 3000
    warmup: int = 300
    spans: int = 2000


class _Discard(SpanExporter):
    """Counts the spans it is given and drops them: the cost measured is poolwatch's and the
    SDK's, not a network's."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def _provider() -> tuple[TracerProvider, _Discard]:
    exporter = _Discard()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 16))
    return provider, exporter


class _SpanPerCheckout(Bare):
    """A bare pool whose every checkout is wrapped in a span (the alternative design)."""

    def __init__(self, tracer: Any) -> None:
        super().__init__()
        self.tracer = tracer

    def start(self, url: str) -> Any:
        pool = super().start(url)
        tracer = self.tracer
        original = pool.connect

        def connect() -> Any:
            with tracer.start_as_current_span("pool.checkout"):
                return original()

        return _Wrapped(connect)


class _Wrapped:
    """An object with the ``connect`` ``cycle()`` calls."""

    def __init__(self, connect: Any) -> None:
        self.connect = connect


def run_free_checkouts(config: HotPathConfig | TraceConfig) -> dict[str, list[float]]:
    """Microseconds per checkout+checkin, per variant, per round."""
    provider, exporter = _provider()
    app = provider.get_tracer("the application")
    variants: dict[str, Any] = {
        "bare": Bare(),
        "poolwatch, spans off": WithPoolwatch(wait_span_threshold=None),
        "poolwatch, spans on": WithPoolwatch(tracer_provider=provider),
        "a span per checkout": _SpanPerCheckout(app),
    }
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"

        def timed(variant: Any) -> float:
            pool = variant.start(url)
            try:
                with app.start_as_current_span("request"):  # the application's span
                    cycle(pool, config.warmup)
                    elapsed = cycle(pool, config.ops)
                variant.check(config.ops)
            finally:
                variant.stop()
            return elapsed / config.ops * 1e6

        samples = interleave(
            {n: (lambda v=v: timed(v)) for n, v in variants.items()}, config.rounds
        )
    provider.shutdown()
    if exporter.exported < config.rounds * (config.ops + config.warmup):
        raise RuntimeError(f"the span-per-checkout variant exported {exporter.exported} spans")
    return samples


def run_slow_waits(config: TraceConfig) -> dict[str, list[float]]:
    """Microseconds per ``Ledger.slow_wait`` (a wait span, its connect child, two
    exemplars), per round; and per bare ``tracer.start_span``/``end`` for scale."""
    provider, exporter = _provider()
    app = provider.get_tracer("the application")
    ledger = Ledger()
    ledger.tracer = tracing_for(provider)
    ledger.span_threshold = 0.001
    ledger.connects_in_wait = True
    ledger.trace_attributes = {c.POOL_NAME: "orders-db", c.POOL_KIND: "sqlalchemy"}

    def slow_waits() -> float:
        with app.start_as_current_span("request"):
            elapsed = 0.0
            for _ in range(config.spans):
                now = perf_counter()
                _inner_connect.set((now - 0.004, now - 0.001, True))
                began = perf_counter()
                ledger.slow_wait(now - 0.005, now, c.OUTCOME_ACQUIRED)
                elapsed += perf_counter() - began
        return elapsed / config.spans * 1e6

    def plain_spans() -> float:
        began = perf_counter()
        for _ in range(config.spans):
            app.start_span("plain").end()
        return (perf_counter() - began) / config.spans * 1e6

    samples = interleave({"slow_wait": slow_waits, "one plain span": plain_spans}, config.rounds)
    provider.shutdown()
    wanted = config.rounds * config.spans * 3  # wait + connect + plain
    if exporter.exported < wanted:
        raise RuntimeError(f"{exporter.exported} spans exported of {wanted}: not measured")
    if not ledger.exemplars:
        raise RuntimeError("slow_wait kept no exemplar")
    return samples


def render(free: dict[str, list[float]], slow: dict[str, list[float]], ops: int) -> str:
    """Both tables, and the verdict."""
    bare = free["bare"]
    rows = []
    for name, values in free.items():
        s = summarize(values)
        added = (
            "" if name == "bare" else f"{summarize(paired_differences(values, bare)).median:+.3f}"
        )
        rows.append([name, f"{s.median:.3f}", s.spread(3), added])
    on_off = paired_differences(free["poolwatch, spans on"], free["poolwatch, spans off"])
    median, low, high = median_interval(on_off)
    span_first = summarize(paired_differences(free["a span per checkout"], bare)).median
    on = summarize(paired_differences(free["poolwatch, spans on"], bare)).median
    slow_rows = [
        [name, f"{summarize(v).median:.2f}", summarize(v).spread(2)] for name, v in slow.items()
    ]
    return "\n".join(
        [
            heading("traces: a free checkout (µs per checkout+checkin, inside a span)"),
            table(["variant", "median", "IQR", "added vs bare"], rows),
            f"spans on - spans off: {median:+.3f} µs (95% interval {low:+.3f} to {high:+.3f}), "
            f"{ops} checkouts a round",
            f"a span per checkout adds {span_first:.2f} µs; poolwatch with spans on adds "
            f"{on:.2f} µs in all",
            heading("traces: a wait past the threshold (µs per wait)"),
            table(["what", "median", "IQR"], slow_rows),
        ]
    )


def main(quick: bool = False) -> None:
    """Run both parts and print them."""
    config = TraceConfig(rounds=7, ops=1000, warmup=100, spans=500) if quick else TraceConfig()
    free = run_free_checkouts(config)
    slow = run_slow_waits(config)
    print(render(free, slow, config.ops), flush=True)


if __name__ == "__main__":
    import sys

    main(quick="--quick" in sys.argv)
