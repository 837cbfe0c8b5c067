"""Ground truth for requests: a Session shared by threads, and ``requests.get()`` per call
(tests/support/truth.py says how; ``POOLWATCH_TRUTH_SEED`` replays a run).

The Session's pool is urllib3's, ``block=False`` with ``pool_maxsize=2``: six threads make
it open connections past its size and discard them. Operations, chosen at random: a
request read whole; a streamed response held across operations (and pauses), read and
closed later; one closed unread (urllib3 closes its connection); one the server answers
with ``Connection: close``; an exception raised while holding one.
"""

from __future__ import annotations

import gc
import logging
import random
from typing import Any

import pytest
import requests

import poolwatch
from tests.support.truth import (
    Comparison,
    CountingUpstream,
    LibraryLog,
    Racing,
    Readers,
    Seeded,
    Tally,
    ThreadGate,
    deadline_after,
    drive_threads,
    figures,
    idle_in_queue,
    library_log,
    pause_moments,
    settle,
)

# Bounds: every loop stops at a count or a time, whichever comes first (the CI budget of
# the whole ground-truth suite is about 150 s on a two-core machine; the soak,
# benchmarks/soak.py, runs the same workloads for minutes).
OPERATIONS = 500
"""Operations of one randomized run, over all its workers (and at most ``SECONDS``)."""
SECONDS = 6.0
PAUSES = 8
WORKERS = 6
MAXSIZE = 2
PER_CALL = 500
"""``requests.get()`` calls (at most ``PER_CALL_SECONDS``), a collection every 10."""
PER_CALL_SECONDS = 5.0


class Injected(Exception):
    """An exception the workload raises on purpose while holding a response."""


class Workload:
    def __init__(self, rng: Seeded, session: requests.Session, url: str, log: LibraryLog):
        self.rng = rng
        self.session = session
        self.url = url
        self.log = log
        self.tally = Tally()
        self.expired = deadline_after(SECONDS)

    def _get(self, **kwargs: Any) -> requests.Response:
        response = self.session.get(self.url, stream=True, timeout=10, **kwargs)
        self.tally.add("checkouts")
        return response

    def _finish(self, response: requests.Response) -> None:
        assert response.content == b"ok\n"  # read whole: the connection goes back
        response.close()
        self.tally.add("returns")

    def step(self, held: list[requests.Response], r: random.Random) -> None:
        if held and (r.random() < 0.4 or len(held) >= 2):
            self.tally.add("held", -1)
            self._finish(held.pop(r.randrange(len(held))))
            return
        roll = r.random()
        if roll < 0.35:
            held.append(self._get())
            self.tally.add("held")
        elif roll < 0.45:
            response = self._get()
            self.log.mark(response.raw.connection, "closed early")
            response.close()  # unread: urllib3 closes the connection, then returns it
            self.tally.add("closed_early")
            self.tally.add("returns")
        elif roll < 0.55:
            response = self._get(headers={"Connection": "close"})
            self.log.mark(response.raw.connection, "ended")
            self.tally.add("server_closed")
            self._finish(response)
        elif roll < 0.62:
            response = self._get()
            try:
                raise Injected("raised while holding a response")
            except Injected:
                pass
            finally:
                self._finish(response)
        else:
            self._finish(self._get())

    def worker(self, index: int, gate: ThreadGate) -> None:
        r = random.Random(self.rng.seed_value * 1000 + index)
        held: list[requests.Response] = []
        try:
            while self.tally["operations"] < OPERATIONS and not self.expired():
                gate.checkpoint()
                if gate.stopping:
                    break
                try:
                    self.step(held, r)
                except Exception as error:
                    self.tally.unexpected_error("step", error)
                self.tally.add("operations")
        finally:
            for response in held:
                self.tally.add("held", -1)
                self._finish(response)


def test_a_session_shared_by_threads(rng: Seeded, readers: Readers) -> None:
    readers.instrument()
    with CountingUpstream() as server, library_log() as log:
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=MAXSIZE))
        poolwatch.track(session, name="truth")
        workload = Workload(rng, session, server.url, log)
        gate = ThreadGate(rng)

        def on_pause(label: str, pending: int) -> None:
            t = workload.tally
            t.assert_expected(rng)
            [pool] = list(session.get_adapter(server.url).poolmanager.pools._container.values())
            idle_lib = idle_in_queue(pool)
            settle(lambda: server.requests == t["checkouts"])
            settle(lambda: server.open_connections == t["held"] + idle_lib)
            got = figures(readers.collect_settled(), "truth")
            cmp = Comparison(f"{label}: requests", rng, got)
            cmp.expect("used", workload=t["held"])
            cmp.expect("idle", library=idle_lib, server=server.open_connections - t["held"])
            cmp.expect("max", workload=MAXSIZE, library=pool.pool.maxsize)
            cmp.expect("pending", workload=0)
            cmp.expect("checkouts", workload=t["checkouts"], server=server.requests)
            cmp.expect("uses", workload=t["returns"])
            cmp.expect("timeouts", workload=0)
            cmp.expect("connects", server=server.connections)
            cmp.reused(t["checkouts"] - server.connections)
            # Closes: a response closed unread closes its connection at once (invalidated);
            # a connection the server ended (Connection: close) is counted when the pool
            # lets go of it: found dropped at a checkout (invalidated) or discarded
            # (pool_full, as every other discard: urllib3's "Connection pool is full").
            cmp.agree(
                "ended by the server",
                workload=t["server_closed"],
                library=log.let_go("ended") + log.in_queue(pool, "ended"),
            )
            cmp.closes(
                {
                    "invalidated": t["closed_early"] + log.resets_of("ended"),
                    # a connection closed early is closed once: its discard closes nothing
                    "pool_full": log.discards - log.discards_of("closed early"),
                    "stale": log.resets - log.resets_of("ended") - log.resets_of("closed early"),
                },
                "workload",
            )
            cmp.check()

        with Racing(readers):
            made = drive_threads(
                gate,
                workload.tally,
                lambda i: workload.worker(i, gate),
                workers=WORKERS,
                moments=pause_moments(rng, OPERATIONS, PAUSES),
                on_pause=on_pause,
            )
        on_pause(f"the end ({made} pauses)", 0)
        session.close()
    readers.assert_clean()


# -- requests.get() per call ------------------------------------------------------------------
def _get_once(url: str) -> None:
    requests.get(url, timeout=5).raise_for_status()  # a new Session, so a new pool, per call


def test_requests_get_per_call_keeps_one_monotonic_series(
    rng: Seeded, readers: Readers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="poolwatch")
    readers.instrument()
    expired = deadline_after(PER_CALL_SECONDS)
    calls = 0
    with CountingUpstream() as server:
        with Racing(readers):
            while calls < PER_CALL and not expired():
                _get_once(server.url)
                calls += 1
                if calls % 10 == 0:
                    # every pool made so far freed, as the app's own collector would
                    gc.collect(1 if calls % 20 else 2)
                    readers.collect()
        readers.assert_clean()
        got = figures(readers.collect_observed(), server.origin)
        cmp = Comparison(f"after {calls} calls", rng, got)
        cmp.expect("checkouts", workload=calls, server=server.requests)
        cmp.expect("connects", server=server.connections)
        cmp.check()
    warned = [r for r in caplog.records if "client_per_request" in r.getMessage()]
    assert len(warned) == 1, f"{rng.replay}: {len(warned)} client_per_request WARNINGs"
