"""Shared helpers of the benchmark suite: interleaved rounds, medians, tables, verdicts.

Every benchmark measures its variants *round by round*: round ``r`` runs each variant once,
in an order rotated by ``r``, so that drift on a shared, noisy machine (another process
waking up, frequency changes) hits every variant alike instead of whichever ran last.
Results are medians over the rounds, with the interquartile range to show the spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Median and interquartile range of one variant's samples."""

    median: float
    q1: float
    q3: float
    samples: tuple[float, ...]

    def spread(self, digits: int = 2) -> str:
        """The interquartile range as text, e.g. ``7.01-7.20``."""
        return f"{self.q1:.{digits}f}-{self.q3:.{digits}f}"


def summarize(samples: Sequence[float]) -> Summary:
    """Median and quartiles of ``samples`` (one sample gives itself three times)."""
    values = tuple(samples)
    if len(values) < 2:
        return Summary(values[0], values[0], values[0], values)
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Summary(median, q1, q3, values)


def interleave(variants: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, rotating the order each round; samples by name."""
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(variants[name]())
    return samples


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """``a[i] - b[i]`` for samples taken in the same round."""
    return [x - y for x, y in zip(a, b, strict=True)]


def median_interval(samples: Sequence[float]) -> tuple[float, float, float]:
    """The median of ``samples`` and a 95% confidence interval for it.

    Distribution-free: the interval runs between the order statistics that a fair coin
    (each sample equally likely above or below the true median) puts 1.96 standard
    deviations from the middle, so it assumes nothing about the samples' shape — network
    latencies are skewed and have outliers.
    """
    values = sorted(samples)
    n = len(values)
    k = max(0, math.floor(n / 2 - 1.96 * math.sqrt(n) / 2))
    return statistics.median(values), values[k], values[n - 1 - k]


def verdict(met: bool) -> str:
    """How a target reads in the tables."""
    return "MET" if met else "NOT MET"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def heading(title: str) -> str:
    """A section title."""
    return f"\n== {title} " + "=" * max(0, 92 - len(title))
