"""The results path: what the workers send back, from the socket to the policy engine.

One thread (`ResultsLoop`) reads the results socket. Every message updates the
worker pool and gives back the ring slots it names; the results of a frame
sent in tiles are gathered and merged into one (inference/tiling.py
TileGather); a frame's result of the
current run is recorded in the run (localizations.csv, inference.csv, latency),
becomes the newest per-frame summary (status, live stream) and an
`Observation` for the policy engine, whose moves are counted for /metrics.
A result for a frame that is not awaiting one (never sent, or answered
already: forged or replayed) is rejected and counted in `rejected`. Between
messages the thread supervises the spawned workers and checks whether the
results have gone stale; `on_hold` hears each change of the engine's hold.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from smartscope.control.policy import Observation
from smartscope.inference.tiling import TileGather
from smartscope.memory import TRIM_EVERY_S, release_free_memory
from smartscope.transport.protocol import LOCALIZATION_COLUMNS, STATE_FIELDS, MalformedMessage

if TYPE_CHECKING:
    from smartscope.acquisition.run import AcquisitionRun
    from smartscope.control.decisions import DecisionLog
    from smartscope.control.engine import PolicyEngine
    from smartscope.inference.pool import WorkerPool
    from smartscope.transport.protocol import Result
    from smartscope.transport.sockets import FramePublisher, ResultReceiver

log = logging.getLogger("smartscope")

#: upper bounds (ms) of the inference latency histogram buckets (/metrics)
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class LatencyHistogram:
    """Cumulative inference latency counts (ms) in LATENCY_BUCKETS_MS; + Inf last."""

    def __init__(self, bounds_ms: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds_ms = tuple(bounds_ms)
        self.counts = [0] * (len(self.bounds_ms) + 1)
        self.sum_ms = 0.0
        self.count = 0

    def observe(self, value_ms: float) -> None:
        self.counts[bisect.bisect_left(self.bounds_ms, value_ms)] += 1
        self.sum_ms += value_ms
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= it) pairs, Prometheus style, ending in '+Inf'."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.bounds_ms), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class ResultsLoop:
    """The results thread and what it keeps for the whole daemon's life (newest result, latency histogram)."""

    def __init__(self, receiver: ResultReceiver, publisher: FramePublisher, pool: WorkerPool,
                 engine: PolicyEngine, decisions: DecisionLog, current_run: Callable[[], AcquisitionRun | None],
                 moves: Counter[tuple[str, str]], stale_after_s: float, notify: Callable[[], None],
                 on_hold: Callable[[bool], None] = lambda holding: None) -> None:
        self._receiver = receiver
        self._publisher = publisher
        self._pool = pool
        self._engine = engine
        self._decisions = decisions
        self._current_run = current_run
        self._moves = moves
        self._stale_after_s = stale_after_s
        self._notify = notify
        self._on_hold = on_hold
        self._holding = False
        self.rejected: Counter[str] = Counter()  # results not taken, by reason
        self.latest: dict[str, Any] | None = None  # newest per-frame summary (stream, status)
        self.latest_result: dict[str, Any] | None = None  # ... with its localizations
        self.results_seen = 0  # per-frame summaries so far (the stream counts what it skips)
        self.latency_hist = LatencyHistogram()
        self.tiles = TileGather()  # tiles' results waiting for the rest of their frame
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="results", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """End the thread (call before the receiver closes)."""
        self._closing.set()
        self._thread.join(2)

    def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                for result in self._receiver.receive(100):
                    try:
                        self._on_result(result)
                    except Exception:  # one bad result must not end the results thread
                        log.exception("result of frame %s could not be processed", result.seq)
            except zmq.ZMQError:
                if self._closing.is_set():
                    return
                raise
            self._pool.supervise(time.time())
            release_free_memory(every_s=TRIM_EVERY_S)
            run = self._current_run()
            grace_over = run is not None and (run.resumed_s is None or
                                              time.time() - run.resumed_s > self._stale_after_s)
            if run is not None and run.state == "acquiring" and grace_over:
                before = self._decisions.count
                self._engine.check_stale()
                if self._decisions.count != before:
                    self._notify()
            self._hold_changed()

    def _hold_changed(self) -> None:
        holding = self._engine.hold_reason is not None
        if holding != self._holding:
            self._holding = holding
            try:
                self._on_hold(holding)
            except Exception:
                log.exception("the safe-hold handler failed")

    def _on_result(self, r: Result) -> None:
        now = time.time()
        self._pool.track(r, now)
        if r.released:
            self._publisher.release(r.released)
        run = self._current_run()
        if r.skipped and run is not None:
            for acquisition, seq in r.skipped:
                self.tiles.discard(acquisition, seq)
            if unknown := run.count_skipped(r.skipped):
                self.rejected["skip_of_unknown_frame"] += unknown
        if r.kind != "result" or run is None or r.header is None:
            return
        if r.header.tile is not None:
            try:
                r = self.tiles.add(r)
            except MalformedMessage:
                self.rejected["malformed_tile"] += 1
                return
            if r is None:  # more tiles of its frame to come
                return
        if r.header.acquisition != run.id:
            self.rejected["other_acquisition"] += 1
            return
        locs = np.asarray(r.localizations, dtype=float).reshape(-1, len(LOCALIZATION_COLUMNS))
        focus_nm = float(np.median(locs[:, 2])) if len(locs) else None
        latency_ms = (now - r.t_capture_s) * 1000
        recorded = run.record(r, locs, focus_nm, latency_ms, now, self._set_point())
        if recorded is None:
            self.rejected["unknown_or_duplicate_frame"] += 1
        if not recorded or r.seq in run.catch_up_seqs:  # a catch-up result is a table row, not a live observation
            return
        self.latency_hist.observe(latency_ms)
        h = r.header
        state = {name: getattr(h, name) for name in STATE_FIELDS}
        index = h.index
        area_um2 = h.shape[0] * h.shape[1] * (h.camera.pixel_size_nm / 1000) ** 2
        obs = Observation(seq=r.seq, t_capture_s=r.t_capture_s, n_emitters=r.n_emitters, localizations=locs,
                          background_photons=r.background_photons, state=state, field_area_um2=area_um2,
                          event_score=r.event_score, emitter_count=r.count_estimate, index=index)
        summary = {"acquisition": run.id, "frame": r.seq, "index": index, "t_capture_s": r.t_capture_s,
                   "n_emitters": r.n_emitters, "emitter_count": r.count_estimate,
                   "event_score": r.event_score, "focus_nm": focus_nm,
                   "latency_ms": round(latency_ms, 3), **state}
        self.latest = summary
        self.latest_result = {**summary, "background_photons": r.background_photons, "worker": r.worker_id,
                              "localizations": locs}
        self.results_seen += 1
        # policies act on the field under the objective: a late result of another position changes nothing
        if run.state == "acquiring" and index["p"] == run.handler.position:
            for entry in self._engine.on_observation(obs, now):
                if entry["applied"] is not None and entry["applied"] != entry["before"]:
                    self._moves[(entry["actuator"], "policy")] += 1
        self._hold_changed()
        self._notify()

    def _set_point(self) -> float | None:
        """The emitter set point of the first enabled policy that has one (illumination)."""
        for slot in self._engine.slots.values():
            value = getattr(slot.policy.params, "set_point_emitters", None)
            if slot.enabled and value is not None:
                return float(value)
        return None
