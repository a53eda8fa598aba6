"""The daemon: one object that owns the core, the sockets, the engine and the runs.

Threads: an acquisition thread per run (pymmcore-plus's MDA runner fed by
an `EventFeed`; its frameReady → `FrameHandler` → storage + workers), and one
results thread (workers → localization table, statistics, policy engine →
actuator). The API and the CLI only call the public methods here.

Run states (as pymmcore-plus's MDA runner): acquiring ⇄ paused → finishing
(files being closed, report drawn) → finished | cancelled | errored.
Listeners registered with `subscribe` are called (from the results or the
acquisition thread, so they must be quick and thread-safe) whenever a new
inference result, decision or state change is there to be read.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
from pymmcore_plus.mda import RunState
from pymmcore_plus.metadata import summary_metadata

from smartscope.acquisition import EventFeed, FrameCounts, FrameHandler, SmartEngine
from smartscope.acquisition.feed import is_time_lapse, planned_interval_ms
from smartscope.acquisition.plan import CheckedPlan, check_plan, time_lapse
from smartscope.config import Range, SmartscopeConfig
from smartscope.control.actuator import Actuator
from smartscope.control.decisions import DecisionLog
from smartscope.control.engine import PolicyEngine, build_policies
from smartscope.control.policy import Observation
from smartscope.control.safety import SafetyEnvelope
from smartscope.hardware import build_core
from smartscope.inference.session import check_fits_frames, read_card
from smartscope.inference.worker import HEARTBEAT_S
from smartscope.storage import FrameWriter, LocalizationWriter
from smartscope.transport.protocol import (
    INDEX_AXES,
    LOCALIZATION_COLUMNS,
    CameraParams,
    Result,
)
from smartscope.transport.sockets import FramePublisher, ResultReceiver

if TYPE_CHECKING:
    import useq

log = logging.getLogger("smartscope")

#: per-frame inference record written next to the data (the report reads it)
INFERENCE_COLUMNS = ("frame", *INDEX_AXES, "t_capture_s", "t_result_s", "latency_ms", "n_emitters", "emitter_count",
                     "focus_nm", "event_score", "background_photons", "set_point_emitters", "worker")
#: upper bounds (ms) of the inference latency histogram buckets (/metrics)
LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
RUN_STATES = ("acquiring", "paused", "finishing", "finished", "cancelled", "errored")


class Busy(RuntimeError):
    """An acquisition is already driving the hardware."""

    def __init__(self, running_id: str) -> None:
        super().__init__(f"acquisition {running_id} is running; stop it first")
        self.running_id = running_id


class WrongState(RuntimeError):
    """The request does not fit the acquisition's state (e.g. resume while acquiring)."""


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


LATENCY_WINDOW = 1_000_000  # frames whose latency the summary's percentiles cover
#: where a frame's capture → result latency goes (per-stage percentiles in the summary):
#: queue: capture → handed to ZeroMQ (storage hand-off, header); transfer: → taken off the socket by a
#: worker (socket queues included); pre / inference / post: the worker's own; return: → the daemon has it.
#: transfer and return compare two hosts' clocks when the worker runs elsewhere.
LATENCY_STAGES = ("queue", "transfer", "pre", "inference", "post", "return")
WORKER_FORGET_S = 600.0  # a worker gone or silent this long leaves the status
STAGE_WINDOW = 100_000


def _percentiles(values) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


@dataclass
class AcquisitionRun:
    id: str
    n_frames: int
    out_dir: Path
    state: str = "acquiring"  # one of RUN_STATES
    exposure_ms: float | None = None
    interval_ms: float | None = None
    sequence: dict[str, Any] | None = None  # the MDASequence it was started with (JSON)
    plan: CheckedPlan | None = None
    handler: FrameHandler | None = None
    inferred: int = 0
    skipped: int = 0  # frames workers conflated away (reported by sequence number)
    localizations: int = 0
    # capture → result latency of the most recent frames (bounded: a run may last days)
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    stages_ms: dict[str, deque[float]] = field(
        default_factory=lambda: {s: deque(maxlen=STAGE_WINDOW) for s in LATENCY_STAGES})
    decisions_at_start: int = 0
    started_s: float = field(default_factory=time.time)
    finished_s: float | None = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    pauses: int = 0
    resumed_s: float | None = None
    saved_lasers: dict[str, float | None] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: FrameWriter | None = None
    locs: LocalizationWriter | None = None
    inference_fh: Any = None
    files_closed: bool = False  # set under `lock` when the writers close: late results are ignored
    inference_csv: Any = None
    summary: dict[str, Any] | None = None
    report_error: str | None = None

    def latency_percentiles(self) -> dict[str, float | None]:
        return _percentiles(self.latencies_ms)

    @property
    def counts(self) -> FrameCounts:
        return self.handler.counts if self.handler is not None else FrameCounts()

    def progress(self) -> dict[str, dict[str, int]]:
        """Per axis of the plan: the highest index reached + 1, of the axis' size."""
        reached = self.handler.reached if self.handler is not None else {}
        sizes = self.plan.sizes if self.plan is not None else {}
        return {axis: {"done": reached.get(axis, -1) + 1, "of": n} for axis, n in sizes.items()}


def camera_params(config: SmartscopeConfig, core) -> CameraParams:
    if config.hardware.mode == "simulated":
        cam = config.simulation.camera
        return CameraParams(pixel_size_nm=cam.pixel_size_nm, offset_adu=cam.offset_adu,
                            e_per_adu=cam.e_per_adu, qe=cam.qe, em_gain=cam.em_gain)
    if config.hardware.camera is not None:
        return config.hardware.camera
    pixel_um = core.getPixelSizeUm()
    log.warning("hardware.camera not set: assuming offset 0, 1 e-/ADU, QE 1")
    return CameraParams(pixel_size_nm=(pixel_um or 0.1) * 1000, offset_adu=0, e_per_adu=1, qe=1)


def _bind_address(socket_address: str) -> str:
    """tcp://host:0 means 'any free port' (tests run many daemons at once)."""
    return socket_address[:-2] + ":*" if socket_address.endswith(":0") else socket_address


class Daemon:
    def __init__(self, config: SmartscopeConfig) -> None:
        self.config = config
        self.core, self.scope = build_core(config)
        self.camera = camera_params(config, self.core)
        shape = (self.core.getImageHeight(), self.core.getImageWidth())
        self.models: dict[str, Path] = {}  # worker flag → model file, each checked against the frames
        for flag, name in (("--model", config.inference.model), ("--counting-model", config.inference.counting_model),
                           ("--event-model", config.inference.event_model)):
            if name:
                path, card = read_card(name)
                check_fits_frames(card, shape, self.camera.pixel_size_nm)
                self.models[flag] = path
        if not self.models:
            raise ValueError("inference: no model configured (model, counting_model or event_model)")
        self.actuator = Actuator(self.core, config.hardware.devices)
        self.mda_engine = SmartEngine(self.core, self.actuator)
        self.core.mda.set_engine(self.mda_engine)
        self.envelope = SafetyEnvelope(config.safety)
        self.decisions = DecisionLog()
        self.engine = PolicyEngine(build_policies(config.policies), self.envelope, self.actuator,
                                   self.decisions, config.safety.stale_after_s)
        t = config.transport
        self.frame_shape = shape
        self.publisher = FramePublisher(_bind_address(t.frames_address), t.send_hwm,
                                        ring_slots=t.ring_slots if t.ring_enabled() else 0,
                                        ring_slot_bytes=shape[0] * shape[1] * self.core.getBytesPerPixel())
        self.receiver = ResultReceiver(_bind_address(t.results_address))
        self.frames_address = self.publisher.endpoint
        self.results_address = self.receiver.endpoint
        self.workers: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, Any] | None = None  # newest per-frame summary (stream, status)
        self.latest_result: dict[str, Any] | None = None  # ... with its localizations
        self.latest_frame: tuple[np.ndarray, dict] | None = None  # newest frame and its state
        self.results_seen = 0  # per-frame summaries so far (the stream counts what it skips)
        self.latency_hist = LatencyHistogram()
        self.moves: Counter[tuple[str, str]] = Counter()  # (actuator, source) → moves
        self._listeners: set[Callable[[], None]] = set()
        self.run: AcquisitionRun | None = None
        self.runs: dict[str, AcquisitionRun] = {}
        self._procs: list[subprocess.Popen] = []
        self._closing = threading.Event()
        self._start_lock = threading.Lock()
        self._results_thread = threading.Thread(target=self._results_loop, name="results", daemon=True)
        self._results_thread.start()

    # -- workers ---------------------------------------------------------------

    def spawn_workers(self, n: int | None = None) -> None:
        n = self.config.inference.workers if n is None else n
        inf = self.config.inference
        threads = inf.threads_per_worker or max(1, (os.cpu_count() or 1) // max(n, 1))
        for _ in range(n):
            cmd = [sys.executable, "-m", "smartscope", "worker", "--frames-address", self.frames_address,
                   "--results-address", self.results_address, "--threads", str(threads),
                   "--warmup", "x".join(map(str, self.frame_shape)),
                   "--provider", inf.provider, "--threshold", str(inf.detection_threshold)]
            if inf.max_batch:
                cmd += ["--max-batch", str(inf.max_batch)]
            if inf.event_views == "one":
                cmd.append("--event-one-view")
            for flag, path in self.models.items():
                cmd += [flag, str(path)]
            if "--model" not in self.models:
                cmd.append("--no-localization")
            self._procs.append(subprocess.Popen(cmd))

    def wait_for_workers(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.time() + timeout_s
        while (active := sum(w["state"] == "active" for w in self.worker_status().values())) < n:
            if time.time() > deadline:
                raise TimeoutError(f"{active}/{n} inference workers said hello in {timeout_s}s")
            if any(p.poll() is not None for p in self._procs):
                raise RuntimeError("an inference worker exited at start (see its log above)")
            time.sleep(0.05)

    # -- acquisitions ----------------------------------------------------------

    @property
    def storage_root(self) -> Path:
        return Path(self.config.storage.root)

    def check_plan(self, sequence: useq.MDASequence) -> CheckedPlan:
        """The plan as it will run, or PlanError naming the field (nothing moves)."""
        safety = self.config.safety
        stage_x_um, stage_y_um = safety.stage_x_um, safety.stage_y_um
        if self.scope is not None:  # the simulated stage's travel is the slide, unless the config narrows it
            max_x_um, max_y_um = self.scope.stage_range_um
            stage_x_um = stage_x_um or Range(min=0, max=max_x_um)
            stage_y_um = stage_y_um or Range(min=0, max=max_y_um)
        return check_plan(sequence, self.core, self.envelope, channel_group=self.core.getChannelGroup() or None,
                          stage_x_um=stage_x_um, stage_y_um=stage_y_um)

    def start_acquisition(self, out_dir: Path | None = None, n_frames: int | None = None, *,
                          exposure_ms: float | None = None, interval_ms: float | None = None,
                          sequence: useq.MDASequence | None = None,
                          policies: list[str] | None = None) -> AcquisitionRun:
        """Start one acquisition in the background; Busy if one is running.

        `sequence`: any useq MDASequence (checked by `check_plan`), or the
        short form n_frames/interval_ms (a time-lapse; interval 0: as fast as
        the camera goes). `policies`: the ones that run (the others are
        disabled). Everything is checked before anything changes.
        """
        if policies is not None and (unknown := sorted(set(policies) - set(self.engine.slots))):
            raise ValueError(f"unknown policies {unknown}; configured: {sorted(self.engine.slots)}")
        acq = self.config.acquisition
        if sequence is not None:
            if n_frames is not None or interval_ms is not None:
                raise ValueError("give either a sequence or frames/interval_ms, not both")
        else:
            sequence = time_lapse(n_frames or acq.frames, acq.interval_ms if interval_ms is None else interval_ms)
        plan = self.check_plan(sequence)
        exposure_ms = exposure_ms or acq.exposure_ms
        interval_ms = planned_interval_ms(plan.sequence)
        initial = {"activation_mw": acq.activation_mw, "excitation_mw": acq.excitation_mw,
                   "interval_ms": interval_ms}
        initial = {k: v for k, v in initial.items() if v is not None and k in self.actuator.available()}
        for name, value in initial.items():
            if name == "interval_ms" and value == 0:
                continue  # as fast as the camera goes: no interval to keep within the envelope
            if not self.envelope.within_range(name, value):
                rng = self.envelope.limits(name).range
                raise ValueError(f"{name} = {value} is outside the safety envelope [{rng.min}, {rng.max}]")
        with self._start_lock:
            if self.run is not None and not self.run.done.is_set():
                raise Busy(self.run.id)
            run_id = uuid.uuid4().hex[:12]
            out_dir = Path(out_dir) if out_dir is not None else self.storage_root / run_id
            out_dir.mkdir(parents=True, exist_ok=True)
            run = AcquisitionRun(id=run_id, n_frames=plan.n_frames, out_dir=out_dir, exposure_ms=exposure_ms,
                                 interval_ms=interval_ms, plan=plan,
                                 sequence=sequence.model_dump(mode="json", exclude_unset=True),
                                 decisions_at_start=self.decisions.count)
            if policies is not None:
                for name in self.engine.slots:
                    self.engine.set_enabled(name, name in policies)
            # a plan that sets Z at every event keeps the focus policy's moves as per-position corrections
            seq = plan.sequence
            plan_sets_z = seq.z_plan is not None or any(p.z is not None for p in seq.stage_positions)
            self.engine.plan_relative = {"z_um": self._correct_focus} if plan_sets_z else {}
            self.core.setExposure(exposure_ms)
            for name, value in initial.items():
                self.actuator.write(name, value)
            self.actuator.refresh()
            shape = (self.core.getImageHeight(), self.core.getImageWidth())
            dtype = np.uint16 if self.core.getBytesPerPixel() == 2 else np.uint8
            flat = is_time_lapse(plan.sequence)  # its length is the run's to decide: unbounded t
            run.writer = FrameWriter(out_dir, shape, dtype, self.camera.pixel_size_nm,
                                     sequence=None if flat else plan.sequence, format=self.config.storage.format,
                                     summary_meta=summary_metadata(self.core, mda_sequence=plan.sequence))
            run.handler = FrameHandler(acquisition_id=run.id, actuator=self.actuator, camera=self.camera,
                                       writer=run.writer, publisher=self.publisher,
                                       infer_channel=self.config.inference.channel,
                                       on_frame=lambda frame, index: setattr(self, "latest_frame", (frame, index)))
            run.locs = LocalizationWriter(out_dir / "localizations.csv")
            run.inference_fh = open(out_dir / "inference.csv", "w", newline="", encoding="utf-8")  # noqa: SIM115
            run.inference_csv = csv.writer(run.inference_fh)
            run.inference_csv.writerow(INFERENCE_COLUMNS)
            self.decisions.set_file(out_dir / "decisions.jsonl")
            self.engine.reset()
            self.run = run
            self.runs[run.id] = run
            threading.Thread(target=self._acquire, args=(run,), name=f"acq-{run.id}", daemon=True).start()
        self._notify()
        return run

    def _correct_focus(self, _actuator: str, obs: Observation, delta_um: float) -> None:
        self.mda_engine.correct_focus(obs.index.get("p", 0), delta_um)

    def _acquire(self, run: AcquisitionRun) -> None:
        """Run the plan through pymmcore-plus's MDA runner, fed event by event (see EventFeed)."""
        steered = run.interval_ms is not None  # one planned interval: the frame-rate policy may steer it
        camera_paces = self.actuator.property_of("interval_ms") is not None
        feed = EventFeed(self.core, run.plan.sequence, camera_paces=camera_paces,
                         interval_ms=(lambda: self.actuator.snapshot()["interval_ms"]) if steered else (lambda: None),
                         delivered=lambda: run.handler.counts.delivered,
                         burst_frames=self.config.acquisition.burst_frames)
        self.mda_engine.plan = run.plan.sequence
        frame_ready = self.core.mda.events.frameReady
        frame_ready.connect(run.handler.frameReady)
        try:
            self.core.mda.run(iter(feed))
            outcome = "cancelled" if run.stop.is_set() else "finished"
        except Exception as e:  # the run fails; the daemon lives on
            log.exception("acquisition %s failed", run.id)
            run.error, outcome = f"{type(e).__name__}: {e}", "errored"
        finally:
            frame_ready.disconnect(run.handler.frameReady)
            self.mda_engine.plan = None
        run.state = "finishing"
        self._drain(run)
        self._set_safe()
        self._finish(run, outcome)

    def _drain(self, run: AcquisitionRun, timeout_s: float = 3.0) -> None:
        """Give in-flight inference results a moment to arrive before closing."""
        deadline = time.time() + timeout_s
        while (run.inferred + run.skipped < run.counts.published and time.time() < deadline
               and any(w["state"] == "active" for w in self.worker_status().values())):
            time.sleep(0.02)

    def _finish(self, run: AcquisitionRun, outcome: str) -> None:
        with run.lock:
            run.files_closed = True
            run.locs.close()
            run.inference_fh.close()
            try:
                run.writer.close()
            except RuntimeError as e:
                run.error, outcome = str(e), "errored"
            run.finished_s = time.time()
            run.state = outcome
            run.summary = self._summary(run)
        self.decisions.set_file(None)
        (run.out_dir / "summary.json").write_text(json.dumps(run.summary, indent=2))
        try:  # the report is a view of the files: a failure to draw it never fails the run
            from smartscope.report import write_report

            write_report(run.out_dir)
        except Exception as e:
            log.exception("could not draw the report of %s", run.id)
            run.report_error = f"{type(e).__name__}: {e}"
            run.summary["report_error"] = run.report_error
            (run.out_dir / "summary.json").write_text(json.dumps(run.summary, indent=2))
        run.done.set()
        self._notify()

    def stop_acquisition(self, wait_s: float | None = 10.0) -> AcquisitionRun | None:
        run = self.run
        if run is None or run.done.is_set():
            return run
        run.stop.set()
        self.core.mda.cancel()
        if self.core.isSequenceRunning():  # a burst ends at once, not at its last frame
            self.core.stopSequenceAcquisition()
        run.done.wait(wait_s)
        return run

    def pause_acquisition(self, wait_s: float = 5.0) -> AcquisitionRun:
        """Pause the runner (a burst stops at once; its remaining frames run on resume), lasers safe.

        The lasers go safe once the runner has paused, or after `wait_s` in any case. LookupError if no
        acquisition has run; WrongState unless it is acquiring.
        """
        run = self._current()
        if run.state != "acquiring":
            raise WrongState(f"acquisition {run.id} is {run.state}: only an acquiring one can pause")
        runner = self.core.mda
        deadline = time.time() + wait_s
        while not run.done.is_set() and time.time() < deadline:
            status = runner.status
            if status.phase == RunState.PAUSED:
                break
            if not status.pause_requested:
                runner.set_paused(True)  # again: a runner still preparing ignores it
            if self.core.isSequenceRunning():
                self.core.stopSequenceAcquisition()
            time.sleep(0.005)
        if run.done.is_set():
            return run
        lasers = [n for n in ("activation_mw", "excitation_mw") if n in self.actuator.available()]
        run.saved_lasers = {n: self.actuator.snapshot()[n] for n in lasers}
        self._set_safe()
        run.pauses += 1
        frame = run.counts.acquired - 1
        self.decisions.append({"t_s": time.time(), "frame": frame, "policy": None, "outcome": "paused",
                               "reason": "pause requested: runner paused, lasers safe"})
        run.state = "paused"
        log.info("acquisition %s paused after %d frames", run.id, run.counts.acquired)
        self._notify()
        return run

    def resume_acquisition(self) -> AcquisitionRun:
        """Lasers back as they were, then the runner goes on with the frames still to come."""
        run = self._current()
        if run.state != "paused":
            raise WrongState(f"acquisition {run.id} is {run.state}: only a paused one can resume")
        for name, value in run.saved_lasers.items():
            if value is not None:
                self.actuator.write(name, value)
        run.resumed_s = time.time()
        self.decisions.append({"t_s": run.resumed_s, "frame": run.counts.acquired, "policy": None,
                               "outcome": "resumed", "reason": "resume requested: lasers restored"})
        run.state = "acquiring"
        self.core.mda.set_paused(False)
        log.info("acquisition %s resumed", run.id)
        self._notify()
        return run

    def _current(self) -> AcquisitionRun:
        if self.run is None:
            raise LookupError("no acquisition has run yet")
        return self.run

    def set_actuator(self, name: str, value: float, source: str = "api") -> None:
        """Write one actuator through the one door, counted for /metrics (caller checked the envelope)."""
        self.actuator.write(name, value)
        self.moves[(name, source)] += 1

    # -- listeners (live stream) -----------------------------------------------

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.add(listener)

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.discard(listener)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a listener's failure is its own; the data path carries on
                log.exception("stream listener failed")

    def _set_safe(self) -> None:
        """Lasers (and anything else with a safe value) to their safe value."""
        for name in self.actuator.available():
            safe = self.envelope.limits(name).safe_value
            if safe is not None:
                try:
                    self.actuator.write(name, safe)
                except Exception:  # keep going: the other lasers still need to go safe
                    log.exception("could not set %s to its safe value", name)

    # -- results ---------------------------------------------------------------

    def _results_loop(self) -> None:
        while not self._closing.is_set():
            try:
                for result in self.receiver.receive(100):
                    try:
                        self._on_result(result)
                    except Exception:  # one bad result must not end the results thread
                        log.exception("result of frame %s could not be processed", result.seq)
            except zmq.ZMQError:
                if self._closing.is_set():
                    return
                raise
            run = self.run
            grace_over = run is not None and (run.resumed_s is None or
                                              time.time() - run.resumed_s > self.config.safety.stale_after_s)
            if run is not None and run.state == "acquiring" and grace_over:
                before = self.decisions.count
                self.engine.check_stale()
                if self.decisions.count != before:
                    self._notify()

    def _track_worker(self, r: Result, now: float) -> None:
        """Every message updates its worker's entry: what it runs, its counters, when it was last heard.

        The entry is replaced whole (readers in other threads never see half of one); workers gone or
        silent for WORKER_FORGET_S are forgotten.
        """
        old = self.workers.get(r.worker_id)
        if old is None:
            for worker_id, w in list(self.workers.items()):
                if now - w["last_seen_s"] > WORKER_FORGET_S:
                    self.workers.pop(worker_id, None)
        self.workers[r.worker_id] = {
            "host": r.host, "first_seen_s": old["first_seen_s"] if old else now,
            "results": (old["results"] if old else 0) + (r.kind == "result"),
            "provider": r.provider, "model": r.model, "threads": r.threads, "max_batch": r.max_batch,
            "last_seen_s": now, "frames_received": r.frames_received, "frames_skipped": r.frames_skipped,
            "malformed_frames": r.malformed, "said_bye": r.kind == "bye"}

    def worker_status(self) -> dict[str, dict[str, Any]]:
        """Each worker heard from, with its state: active, silent (no message for 3 heartbeats) or gone (bye)."""
        now = time.time()
        out = {}
        for worker_id, w in list(self.workers.items()):
            state = "gone" if w["said_bye"] else "silent" if now - w["last_seen_s"] > 3 * HEARTBEAT_S else "active"
            out[worker_id] = {**w, "state": state}
        return out

    def _on_result(self, r: Result) -> None:
        now = time.time()
        self._track_worker(r, now)
        if r.released:
            self.publisher.release(r.released)
        run = self.run
        if r.skipped and run is not None:
            with run.lock:
                if not run.files_closed:
                    run.skipped += sum(acquisition == run.id for acquisition, _ in r.skipped)
        if r.kind != "result" or run is None or r.header is None or r.header.acquisition != run.id:
            return
        locs = np.asarray(r.localizations, dtype=float).reshape(-1, len(LOCALIZATION_COLUMNS))
        focus_nm = float(np.median(locs[:, 2])) if len(locs) else None
        latency_ms = (now - r.t_capture_s) * 1000
        set_point = self._set_point()
        with run.lock:
            if run.files_closed or run.locs is None:
                return
            run.inferred += 1
            run.localizations += len(locs)
            run.latencies_ms.append(latency_ms)
            if r.stages is not None and r.header.t_sent_s is not None:
                st = r.stages
                for name, value_ms in zip(LATENCY_STAGES, (
                        (r.header.t_sent_s - r.t_capture_s) * 1000, (st.t_received_s - r.header.t_sent_s) * 1000,
                        st.pre_ms, st.infer_ms, st.post_ms, (now - r.t_done_s) * 1000), strict=True):
                    run.stages_ms[name].append(value_ms)
            run.locs.write(r.seq, locs, r.background_photons)
            run.inference_csv.writerow([
                r.seq, *(getattr(r.header, axis) for axis in INDEX_AXES), f"{r.t_capture_s:.6f}", f"{now:.6f}",
                f"{latency_ms:.3f}", r.n_emitters,
                "" if r.count_estimate is None else r.count_estimate,
                "" if focus_nm is None else f"{focus_nm:.2f}", "" if r.event_score is None else f"{r.event_score:.4f}",
                "" if r.background_photons is None else f"{r.background_photons:.3f}",
                "" if set_point is None else set_point, r.worker_id])
        self.latency_hist.observe(latency_ms)
        h = r.header
        state = {"activation_mw": h.activation_mw, "excitation_mw": h.excitation_mw, "x_um": h.x_um, "y_um": h.y_um,
                 "z_um": h.z_um, "interval_ms": h.interval_ms, "angle_deg": h.angle_deg}
        index = {axis: getattr(h, axis) for axis in INDEX_AXES}
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
            for entry in self.engine.on_observation(obs, now):
                if entry["applied"] is not None and entry["applied"] != entry["before"]:
                    self.moves[(entry["actuator"], "policy")] += 1
        self._notify()

    def _set_point(self) -> float | None:
        """The emitter set point of the first enabled policy that has one (illumination)."""
        for slot in self.engine.slots.values():
            value = getattr(slot.policy.params, "set_point_emitters", None)
            if slot.enabled and value is not None:
                return float(value)
        return None

    # -- reporting -------------------------------------------------------------

    def _summary(self, run: AcquisitionRun) -> dict[str, Any]:
        duration = (run.finished_s or time.time()) - run.started_s
        workers = self.worker_status()
        providers = sorted({w["provider"] for w in workers.values()})
        malformed_frames: Counter[str] = Counter()
        for w in workers.values():
            malformed_frames.update(w["malformed_frames"])
        return {
            "acquisition": run.id,
            "state": run.state,
            "error": run.error,
            "frames_requested": run.n_frames,
            "progress": run.progress(),
            "exposure_ms": run.exposure_ms,
            "interval_ms": run.interval_ms,
            "sequence": run.sequence,
            "pauses": run.pauses,
            "frames_acquired": run.counts.acquired,
            "frames_saved": run.writer.saved if run.writer else 0,
            "frames_published": run.counts.published,
            "frames_inferred": run.inferred,
            "frames_dropped_inference": run.counts.acquired - run.inferred,
            "frames_not_sent": run.counts.dropped_inference,
            "frames_skipped_by_workers": run.skipped,
            "frames_lost": run.counts.published - run.inferred - run.skipped,
            "localizations": run.localizations,
            "latency_ms": run.latency_percentiles(),
            "latency_stages_ms": {name: _percentiles(v) for name, v in run.stages_ms.items()},
            "duration_s": round(duration, 3),
            "inference_rate_hz": round(run.inferred / duration, 2) if duration > 0 else None,
            "provider": providers[0] if len(providers) == 1 else providers,
            "workers": sum(w["state"] == "active" for w in workers.values()),
            "actions": {name: self.engine.actions.get(name, 0) for name in self.engine.slots},
            "policies_enabled": [name for name, slot in self.engine.slots.items() if slot.enabled],
            "decisions": self.decisions.count - run.decisions_at_start,
            "malformed_frames": dict(malformed_frames),
            "malformed_results": dict(self.receiver.malformed),
            "frame_ring": self.publisher.ring.stats() if self.publisher.ring else None,
            "policies": {name: {"enabled": slot.enabled, "params": slot.policy.params.model_dump()}
                         for name, slot in self.engine.slots.items()},
            "files": {k: str(run.out_dir / f) for k, f in (
                ("frames", run.writer.path.name if run.writer else "frames.ome.tif"), ("frame_states", "frames.csv"),
                ("localizations", "localizations.csv"), ("decisions", "decisions.jsonl"),
                ("inference", "inference.csv"), ("report", "report.png"), ("report_data", "report.csv"))},
        }

    def status(self) -> dict[str, Any]:
        run = self.run
        workers = self.worker_status()
        base = {"state": "idle" if run is None else run.state,
                "provider": sorted({w["provider"] for w in workers.values() if w["state"] == "active"}),
                "workers": workers, "hold": self.engine.hold_reason, "engine": self.engine.status(),
                "actuators": self.actuator.snapshot(), "latest": self.latest}
        if run is not None:
            base.update({"acquisition": run.id, **{k: v for k, v in self._summary(run).items()
                                                   if k.startswith(("frames", "latency", "actions", "local"))},
                         "frames_pending_storage": run.writer.pending if run.writer else 0})
        return base

    # -- shutdown --------------------------------------------------------------

    def close(self) -> None:
        """Stop the run (files flushed and closed), lasers safe, workers told to exit, sockets closed."""
        self.stop_acquisition(wait_s=60)
        self._set_safe()
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        self._closing.set()
        self._results_thread.join(2)
        self.publisher.close()
        self.receiver.close()
