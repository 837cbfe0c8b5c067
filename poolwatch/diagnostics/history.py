"""A series' counts over the last minutes, for sizing advice (``PoolSnapshot.sizing``).

A sample of each series' counts is kept every ``SAMPLE_EVERY`` seconds (the last
``SAMPLES_KEPT``, from zero at the series' creation at first); sizing applies Little's law
(``advice.sizing``) to the window between the oldest sample and now.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from poolwatch import _catalogue as c
from poolwatch._models import Sizing
from poolwatch._registry import SeriesReading
from poolwatch.diagnostics.advice import Counts, sizing

SAMPLE_EVERY = 30.0
"""Seconds between two samples of a series' counts kept for sizing advice."""
SAMPLES_KEPT = 10
"""Samples kept: sizing looks at up to the last five minutes."""


class Sample(NamedTuple):
    """A series' counts at one moment, for rates over a window (sizing advice)."""

    at: float
    """``time.monotonic()``."""
    checkouts: int
    timeouts: int
    hold_total: float
    holds: int
    wait_total: float


class History:
    """Samples of every series' counts, by the series' serial number."""

    def __init__(self) -> None:
        self._samples: dict[int, deque[Sample]] = {}

    def _of(self, reading: SeriesReading) -> deque[Sample]:
        serial = reading.series.serial
        samples = self._samples.get(serial)
        if samples is None:
            # From zero at the series' creation, so that sizing can start at once.
            age = max(time.time_ns() - reading.series.created_ns, 0) / 1e9
            start = Sample(time.monotonic() - age, 0, 0, 0.0, 0, 0.0)
            samples = self._samples[serial] = deque([start], SAMPLES_KEPT)
        return samples

    def observe(self, readings: Iterable[SeriesReading], now: float) -> None:
        """Sample each series due for one (``now``: ``time.monotonic()``)."""
        for reading in readings:
            samples = self._of(reading)
            if now - samples[-1].at >= SAMPLE_EVERY:
                ledger = reading.ledger
                use = ledger.use
                waited = ledger.wait[c.OUTCOME_ACQUIRED].total
                samples.append(
                    Sample(
                        now, ledger.checkouts, ledger.timeouts, use.total, use.observations, waited
                    )
                )

    def forget(self, serial: int) -> None:
        """A series was removed."""
        self._samples.pop(serial, None)

    def clear(self) -> None:
        """Start over (a forked child)."""
        self._samples.clear()

    def sizing(self, reading: SeriesReading) -> Sizing | None:
        """Little's law over the window the samples cover (from creation at first)."""
        before = self._of(reading)[0]
        seconds = time.monotonic() - before.at
        series, levels, ledger = reading.series, reading.levels, reading.ledger
        use = ledger.use
        now = Counts(
            series.kind,
            series.name,
            used=levels.used,
            max=levels.max,
            checkouts=ledger.checkouts,
            timeouts=ledger.timeouts,
            hold_total=use.total,
            holds=use.observations,
            wait_total=ledger.wait[c.OUTCOME_ACQUIRED].total,
        )
        then = Counts(
            series.kind,
            series.name,
            checkouts=before.checkouts,
            timeouts=before.timeouts,
            hold_total=before.hold_total,
            holds=before.holds,
            wait_total=before.wait_total,
        )
        return sizing(now, then, seconds)
