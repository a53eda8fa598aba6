"""`/metrics`: the daemon's counters in Prometheus text format, read at scrape time.

A collector, not live metric objects: every number comes from the daemon's own
state (its runs, latency histogram, move counts, workers), so nothing is
counted twice and several daemons in one process never share a registry.
Counters run since the daemon started (they never go down).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from smartscope.acquisition.run import RUN_STATES

if TYPE_CHECKING:
    from collections.abc import Iterator

    from smartscope.service import Daemon

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonCollector:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator:
        d = self._daemon
        runs = list(d.runs.values())
        for name, doc, value in (
            ("frames_acquired", "frames read from the camera", sum(r.counts.acquired for r in runs)),
            ("frames_saved", "frames written to storage (OME-TIFF or OME-Zarr)", sum(r.writer.saved for r in runs if r.writer)),
            ("frames_inferred", "frames with an inference result", sum(r.inferred for r in runs)),
            ("frames_dropped", "frames not sent to inference because a newer frame replaced them while every "
             "worker was busy, or of a channel not inferred (still saved)",
             sum(r.counts.dropped_inference for r in runs)),
            ("frames_skipped", "frames workers skipped for newer ones or could not read (still saved)",
             sum(r.skipped for r in runs)),
            ("frames_lost", "frames sent to inference with neither a result nor a skip (acquired = inferred + "
             "skipped + dropped + lost)", sum(r.lost for r in runs)),
            ("localizations", "localizations written", sum(r.localizations for r in runs)),
            ("decisions", "policy engine decisions logged", d.decisions.count),
            ("malformed_results", "result messages from workers that did not decode",
             sum(d.receiver.malformed.values())),
            ("acquisitions", "acquisitions started", len(runs)),
            ("worker_respawns", "inference workers started again after one died", d.pool.respawns),
        ):
            yield CounterMetricFamily(f"smartscope_{name}", doc, value=value)
        rejected = CounterMetricFamily("smartscope_results_rejected", "messages on the results socket not taken, "
                                       "by reason (malformed, forged or duplicate, unauthenticated)",
                                       labels=["reason"])
        for reason, n in sorted(d.rejected_results().items()):
            rejected.add_metric([reason], n)
        yield rejected

        h = d.latency_hist
        buckets = [(b if b == "+Inf" else str(float(b) / 1000), n) for b, n in h.cumulative()]
        yield HistogramMetricFamily("smartscope_inference_latency_seconds",
                                    "frame capture to inference result", buckets=buckets,
                                    sum_value=h.sum_ms / 1000)

        moves = CounterMetricFamily("smartscope_actuator_moves", "actuator changes made, by actuator and source "
                                    "(policy engine or API)", labels=["actuator", "source"])
        for (actuator, source), n in sorted(d.moves.items()):
            moves.add_metric([actuator, source], n)
        yield moves

        workers = GaugeMetricFamily("smartscope_workers", "inference workers, by execution provider and state "
                                    "(active, silent, gone)", labels=["provider", "state"])
        by_provider: Counter[tuple[str, str]] = Counter()
        malformed: Counter[str] = Counter()
        for w in d.worker_status().values():
            by_provider[(w["provider"], w["state"])] += 1
            malformed.update(w["malformed_frames"])
        for (provider, worker_state), n in sorted(by_provider.items()):
            workers.add_metric([provider, worker_state], n)
        yield workers
        bad = CounterMetricFamily("smartscope_malformed_frames", "frame messages workers dropped, by reason",
                                  labels=["reason"])
        for reason, n in sorted(malformed.items()):
            bad.add_metric([reason], n)
        yield bad

        run = d.run
        state = run.state if run is not None else "idle"
        states = GaugeMetricFamily("smartscope_acquisition_state", "1 for the current acquisition state",
                                   labels=["state"])
        for s in ("idle", *RUN_STATES):
            states.add_metric([s], 1.0 if s == state else 0.0)
        yield states
        yield GaugeMetricFamily("smartscope_safe_hold", "1 while the policy engine holds a safe state",
                                value=1.0 if d.engine.hold_reason else 0.0)
        yield GaugeMetricFamily("smartscope_frames_pending_storage", "frames queued for the OME-TIFF writer",
                                value=run.writer.pending if run is not None and run.writer else 0)
        actuators = GaugeMetricFamily("smartscope_actuator_value", "last value set, in the actuator's unit "
                                      "(mW, µm, ms, degrees)", labels=["actuator"])
        for name, value in d.actuator.snapshot().items():
            if value is not None:
                actuators.add_metric([name], value)
        yield actuators


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def build_registry(daemon: Daemon) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(daemon))
    return registry
