"""The daemon: one object that owns the core, the sockets, the engine and the runs.

Threads: an acquisition thread per run (camera → storage + workers), and one
results thread (workers → localization table, statistics, policy engine →
actuator). The API and the CLI only call the public methods here.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from smartscope.acquisition import LoopCounts, run_sequence
from smartscope.config import SmartscopeConfig
from smartscope.control.actuator import Actuator
from smartscope.control.decisions import DecisionLog
from smartscope.control.engine import PolicyEngine, build_policies
from smartscope.control.policy import Observation
from smartscope.control.safety import SafetyEnvelope
from smartscope.hardware import build_core
from smartscope.inference.session import check_fits_frames, read_card
from smartscope.storage import FrameWriter, LocalizationWriter
from smartscope.transport.protocol import CameraParams, Result
from smartscope.transport.sockets import FramePublisher, ResultReceiver

log = logging.getLogger("smartscope")


class Busy(RuntimeError):
    """An acquisition is already driving the hardware."""

    def __init__(self, running_id: str) -> None:
        super().__init__(f"acquisition {running_id} is running; stop it first")
        self.running_id = running_id


@dataclass
class AcquisitionRun:
    id: str
    n_frames: int
    out_dir: Path
    state: str = "acquiring"  # acquiring → finishing → finished | cancelled | errored
    counts: LoopCounts = field(default_factory=LoopCounts)
    inferred: int = 0
    localizations: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    started_s: float = field(default_factory=time.time)
    finished_s: float | None = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: FrameWriter | None = None
    locs: LocalizationWriter | None = None
    summary: dict[str, Any] | None = None

    def latency_percentiles(self) -> dict[str, float | None]:
        if not self.latencies_ms:
            return {"p50": None, "p99": None}
        p50, p99 = np.percentile(self.latencies_ms, [50, 99])
        return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


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
        self.model_path, self.card = read_card(config.inference.model)
        self.core, self.scope = build_core(config)
        self.camera = camera_params(config, self.core)
        shape = (self.core.getImageHeight(), self.core.getImageWidth())
        check_fits_frames(self.card, shape, self.camera.pixel_size_nm)
        self.actuator = Actuator(self.core, config.hardware.devices)
        self.envelope = SafetyEnvelope(config.safety)
        self.decisions = DecisionLog()
        self.engine = PolicyEngine(build_policies(config.policies), self.envelope, self.actuator,
                                   self.decisions, config.safety.stale_after_s)
        t = config.transport
        self.publisher = FramePublisher(_bind_address(t.frames_address), t.send_hwm)
        self.receiver = ResultReceiver(_bind_address(t.results_address))
        self.frames_address = self.publisher.endpoint
        self.results_address = self.receiver.endpoint
        self.workers: dict[str, dict[str, Any]] = {}
        self.latest: dict[str, Any] | None = None
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
        for _ in range(n):
            cmd = [sys.executable, "-m", "smartscope", "worker", "--frames-address", self.frames_address,
                   "--results-address", self.results_address, "--model", str(self.model_path),
                   "--provider", inf.provider, "--threshold", str(inf.detection_threshold)]
            self._procs.append(subprocess.Popen(cmd))

    def wait_for_workers(self, n: int, timeout_s: float = 60.0) -> None:
        deadline = time.time() + timeout_s
        while len(self.workers) < n:
            if time.time() > deadline:
                raise TimeoutError(f"{len(self.workers)}/{n} inference workers said hello in {timeout_s}s")
            if any(p.poll() is not None for p in self._procs):
                raise RuntimeError("an inference worker exited at start (see its log above)")
            time.sleep(0.05)

    # -- acquisitions ----------------------------------------------------------

    @property
    def storage_root(self) -> Path:
        return Path(self.config.storage.root)

    def start_acquisition(self, out_dir: Path | None = None, n_frames: int | None = None, *,
                          exposure_ms: float | None = None, interval_ms: float | None = None) -> AcquisitionRun:
        """Start one acquisition in the background; Busy if one is running."""
        acq = self.config.acquisition
        n_frames = n_frames or acq.frames
        exposure_ms = exposure_ms or acq.exposure_ms
        interval_ms = acq.interval_ms if interval_ms is None else interval_ms
        initial = {"activation_mw": acq.activation_mw, "excitation_mw": acq.excitation_mw,
                   "interval_ms": interval_ms}
        initial = {k: v for k, v in initial.items() if v is not None and k in self.actuator.available()}
        for name, value in initial.items():
            if not self.envelope.within_range(name, value):
                rng = self.envelope.limits(name).range
                raise ValueError(f"{name} = {value} is outside the safety envelope [{rng.min}, {rng.max}]")
        with self._start_lock:
            if self.run is not None and not self.run.done.is_set():
                raise Busy(self.run.id)
            run_id = uuid.uuid4().hex[:12]
            out_dir = Path(out_dir) if out_dir is not None else self.storage_root / run_id
            out_dir.mkdir(parents=True, exist_ok=True)
            run = AcquisitionRun(id=run_id, n_frames=n_frames, out_dir=out_dir)
            self.core.setExposure(exposure_ms)
            for name, value in initial.items():
                self.actuator.write(name, value)
            self.actuator.refresh()
            shape = (self.core.getImageHeight(), self.core.getImageWidth())
            dtype = np.uint16 if self.core.getBytesPerPixel() == 2 else np.uint8
            run.writer = FrameWriter(out_dir, n_frames, shape, dtype, self.camera.pixel_size_nm)
            run.locs = LocalizationWriter(out_dir / "localizations.csv")
            self.decisions.set_file(out_dir / "decisions.jsonl")
            self.engine.reset()
            self.run = run
            self.runs[run.id] = run
            threading.Thread(target=self._acquire, args=(run,), name=f"acq-{run.id}", daemon=True).start()
        return run

    def _acquire(self, run: AcquisitionRun) -> None:
        try:
            run_sequence(self.core, n_frames=run.n_frames, acquisition_id=run.id, actuator=self.actuator,
                         camera=self.camera, writer=run.writer, publisher=self.publisher,
                         stop=run.stop, counts=run.counts)
            outcome = "cancelled" if run.stop.is_set() else "finished"
        except Exception as e:  # the run fails; the daemon lives on
            log.exception("acquisition %s failed", run.id)
            run.error, outcome = f"{type(e).__name__}: {e}", "errored"
        run.state = "finishing"
        self._drain(run)
        self._set_safe()
        self._finish(run, outcome)

    def _drain(self, run: AcquisitionRun, timeout_s: float = 3.0) -> None:
        """Give in-flight inference results a moment to arrive before closing."""
        deadline = time.time() + timeout_s
        while run.inferred < run.counts.published and time.time() < deadline and self.workers:
            time.sleep(0.02)

    def _finish(self, run: AcquisitionRun, outcome: str) -> None:
        with run.lock:
            run.locs.close()
            try:
                run.writer.close()
            except RuntimeError as e:
                run.error, outcome = str(e), "errored"
            run.finished_s = time.time()
            run.state = outcome
            run.summary = self._summary(run)
        (run.out_dir / "summary.json").write_text(json.dumps(run.summary, indent=2))
        self.decisions.set_file(None)
        run.done.set()

    def stop_acquisition(self, wait_s: float | None = 10.0) -> AcquisitionRun | None:
        run = self.run
        if run is None or run.done.is_set():
            return run
        run.stop.set()
        run.done.wait(wait_s)
        return run

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
                    self._on_result(result)
            except zmq.ZMQError:
                if self._closing.is_set():
                    return
                raise
            run = self.run
            if run is not None and run.state == "acquiring":
                self.engine.check_stale()

    def _on_result(self, r: Result) -> None:
        self.workers[r.worker_id] = {"provider": r.provider, "model": r.model, "last_seen_s": time.time(),
                                     "malformed_frames": r.malformed_frames}
        run = self.run
        if r.kind != "result" or run is None or r.header is None or r.header.acquisition != run.id:
            return
        now = time.time()
        locs = np.asarray(r.localizations, dtype=float).reshape(-1, 6)
        with run.lock:
            if run.done.is_set() or run.locs is None:
                return
            run.inferred += 1
            run.localizations += len(locs)
            run.latencies_ms.append((now - r.t_capture_s) * 1000)
            run.locs.write(r.seq, locs, r.background_photons)
        h = r.header
        state = {"activation_mw": h.activation_mw, "excitation_mw": h.excitation_mw, "z_um": h.z_um,
                 "interval_ms": h.interval_ms, "angle_deg": h.angle_deg}
        area_um2 = h.shape[0] * h.shape[1] * (h.camera.pixel_size_nm / 1000) ** 2
        obs = Observation(seq=r.seq, t_capture_s=r.t_capture_s, n_emitters=r.n_emitters, localizations=locs,
                          background_photons=r.background_photons, state=state, field_area_um2=area_um2,
                          event_score=r.event_score)
        self.latest = {"frame": r.seq, "t_capture_s": r.t_capture_s, "n_emitters": r.n_emitters,
                       "event_score": r.event_score, "latency_ms": run.latencies_ms[-1], **state}
        if run.state == "acquiring":
            self.engine.on_observation(obs, now)

    # -- reporting -------------------------------------------------------------

    def _summary(self, run: AcquisitionRun) -> dict[str, Any]:
        duration = (run.finished_s or time.time()) - run.started_s
        providers = sorted({w["provider"] for w in self.workers.values()})
        return {
            "acquisition": run.id,
            "state": run.state,
            "error": run.error,
            "frames_requested": run.n_frames,
            "frames_acquired": run.counts.acquired,
            "frames_saved": run.writer.saved if run.writer else 0,
            "frames_published": run.counts.published,
            "frames_inferred": run.inferred,
            "frames_dropped_inference": run.counts.acquired - run.inferred,
            "frames_not_sent": run.counts.dropped_inference,
            "localizations": run.localizations,
            "latency_ms": run.latency_percentiles(),
            "duration_s": round(duration, 3),
            "inference_rate_hz": round(run.inferred / duration, 2) if duration > 0 else None,
            "provider": providers[0] if len(providers) == 1 else providers,
            "workers": len(self.workers),
            "actions": {name: self.engine.actions.get(name, 0) for name in self.engine.slots},
            "decisions": self.decisions.count,
            "malformed_results": self.receiver.malformed,
            "files": {k: str(run.out_dir / f) for k, f in (
                ("frames", "frames.ome.tif"), ("frame_states", "frames.csv"),
                ("localizations", "localizations.csv"), ("decisions", "decisions.jsonl"))},
        }

    def status(self) -> dict[str, Any]:
        run = self.run
        base = {"state": "idle" if run is None else run.state,
                "provider": sorted({w["provider"] for w in self.workers.values()}),
                "workers": self.workers, "hold": self.engine.hold_reason,
                "actuators": self.actuator.snapshot(), "latest": self.latest}
        if run is not None:
            base.update({"acquisition": run.id, **{k: v for k, v in self._summary(run).items()
                                                   if k.startswith(("frames", "latency", "actions", "local"))},
                         "frames_pending_storage": run.writer.pending if run.writer else 0})
        return base

    # -- shutdown --------------------------------------------------------------

    def close(self) -> None:
        """Stop the run, lasers safe, workers told to exit, sockets closed."""
        self.stop_acquisition()
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
