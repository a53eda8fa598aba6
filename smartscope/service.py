"""The daemon: the one object the API, the CLI and the tests call; it builds the parts and runs acquisitions.

`Daemon` composes: the core and its actuator (the one door to the hardware),
the MDA engine, the policy engine with its safety envelope and decision log,
the frame and result sockets, the worker pool (`inference.pool`) and the
results thread (`results`). It keeps a run's life here: start (plan checked
first), the acquisition thread (pymmcore-plus's MDA runner fed by an
`EventFeed`; frameReady → `FrameHandler` → storage + workers), pause/resume,
stop, the files closed and summary.json and the report written
(`acquisition.run` holds the run's record and summary), the safe state, close.

Run states (as pymmcore-plus's MDA runner): acquiring ⇄ paused → finishing
(files being closed, report drawn) → finished | cancelled | errored.
Listeners registered with `subscribe` are called (from the results or the
acquisition thread, so they must be quick and thread-safe) whenever a new
inference result, decision or state change is there to be read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
from pymmcore_plus.mda import RunState
from pymmcore_plus.metadata import summary_metadata

from smartscope.acquisition import EventFeed, FrameHandler, SmartEngine
from smartscope.acquisition.catch_up import catch_up
from smartscope.acquisition.feed import is_time_lapse, planned_interval_ms
from smartscope.acquisition.plan import CheckedPlan, check_plan, sets_z, time_lapse
from smartscope.acquisition.run import AcquisitionRun, load_run, summarize
from smartscope.config import ConfigError, InferenceConfig, Range, SmartscopeConfig
from smartscope.control.actuator import Actuator
from smartscope.control.decisions import DecisionLog
from smartscope.control.engine import PolicyEngine, build_policies
from smartscope.control.safety import SafetyEnvelope
from smartscope.hardware import build_core
from smartscope.inference.pool import WorkerPool, worker_models
from smartscope.inference.session import load_model
from smartscope.inference.tiling import FrameTiler
from smartscope.memory import forget_iterated_plans, release_free_memory
from smartscope.results import ResultsLoop
from smartscope.storage import FrameWriter
from smartscope.transport.keys import local_worker_key_files, server_keys, start_authenticator
from smartscope.transport.protocol import CameraParams
from smartscope.transport.sockets import FramePublisher, ResultReceiver

if TYPE_CHECKING:
    import useq

    from smartscope.control.policy import Observation
    from smartscope.results import LatencyHistogram

log = logging.getLogger("smartscope")


#: run records the daemon keeps in memory (GET /acquisitions); older runs stay on disk
RUNS_KEPT = 1000


class Busy(RuntimeError):
    """An acquisition is already driving the hardware."""

    def __init__(self, running_id: str) -> None:
        super().__init__(f"acquisition {running_id} is running; stop it first")
        self.running_id = running_id


class WrongState(RuntimeError):
    """The request does not fit the acquisition's state (e.g. resume while acquiring)."""


class NoWorkers(RuntimeError):
    """No inference worker is live, and the run was not asked to start without one."""


def camera_params(config: SmartscopeConfig, core) -> CameraParams:
    if config.hardware.mode == "simulated":
        return CameraParams.model_validate(config.simulation.camera, from_attributes=True)
    if config.hardware.camera is not None:
        return config.hardware.camera
    pixel_um = core.getPixelSizeUm()
    log.warning("hardware.camera not set: assuming offset 0, 1 e-/ADU, QE 1")
    return CameraParams(pixel_size_nm=(pixel_um or 0.1) * 1000, offset_adu=0, e_per_adu=1, qe=1)


def _bind_address(socket_address: str) -> str:
    """tcp://host:0 means 'any free port' (tests run many daemons at once)."""
    return socket_address[:-2] + ":*" if socket_address.endswith(":0") else socket_address


def _bound(setting: str, address: str, make: Callable[[str], Any]) -> Any:
    """A socket made by `make` on the address; a port in use is a ConfigError naming the setting."""
    try:
        return make(_bind_address(address))
    except zmq.ZMQError as e:
        raise ConfigError(f"cannot listen on {address} ({e.strerror}): another program, or another smartscope, "
                          f"uses it; change transport.{setting} in the config") from None


def frame_tiler(inference: InferenceConfig, models: dict[str, Path], shape_px: tuple[int, int]) -> FrameTiler | None:
    """The frame sender's tiler when frames of this camera are larger than inference.tile_px and the workers run
    the localization model alone (the counting and event models look at whole frames); else None."""
    if inference.tile_px is None or max(shape_px) <= inference.tile_px:
        return None
    if set(models) != {"--model"}:
        log.warning("frames of %dx%d px go to the workers whole, over inference.tile_px %d: the counting and "
                    "event models look at whole frames", *shape_px, inference.tile_px)
        return None
    return FrameTiler(load_model(models["--model"], "cpu", threads=1), inference.tile_px)


class Daemon:
    """The facade: every public method and attribute here is what the API, the CLI and the tests use."""

    def __init__(self, config: SmartscopeConfig) -> None:
        self.config = config
        self.core, self.scope = build_core(config)
        self.camera = camera_params(config, self.core)
        shape = (self.core.getImageHeight(), self.core.getImageWidth())
        models, cards = worker_models(config.inference, shape, self.camera.pixel_size_nm)
        self.tiler = frame_tiler(config.inference, models, shape)
        self.actuator = Actuator(self.core, config.hardware.devices)
        z_range = config.safety.z_um.range
        self.mda_engine = SmartEngine(self.core, self.actuator, z_range_um=(z_range.min, z_range.max))
        self.core.mda.set_engine(self.mda_engine)
        self.envelope = SafetyEnvelope(config.safety)
        self.decisions = DecisionLog()
        self.engine = PolicyEngine(build_policies(config.policies, cards), self.envelope, self.actuator,
                                   self.decisions, config.safety.stale_after_s)
        t = config.transport
        self.zmq_context = zmq.Context()  # its own: the ZAP handler (CURVE) is per context
        keys, key_args = None, ("--no-auth",)  # spawned workers use the daemon's auth, not their default config's
        self.authenticator = self.authorized_keys = None
        if t.auth == "curve":
            keys = server_keys(t.resolved_keys_dir())
            self.authenticator, self.authorized_keys = start_authenticator(self.zmq_context, keys)
            server_key, worker_key = local_worker_key_files(t.resolved_keys_dir())
            key_args = ("--server-key", str(server_key), "--client-key", str(worker_key))
        self.publisher = _bound("frames_address", t.frames_address, lambda address: FramePublisher(
            address, t.send_hwm, ring_slots=t.ring_slots if t.ring_enabled() else 0,
            ring_slot_bytes=shape[0] * shape[1] * self.core.getBytesPerPixel(), ctx=self.zmq_context, keys=keys,
            tiler=self.tiler))
        self.receiver = _bound("results_address", t.results_address,
                               lambda address: ResultReceiver(address, ctx=self.zmq_context, keys=keys))
        self.frames_address = self.publisher.endpoint
        self.results_address = self.receiver.endpoint
        tiles = self.tiler.tiles_for(shape) if self.tiler else []
        self.tiles_per_frame = max(len(tiles), 1)
        # what a worker's first frame will be: the whole frame or the largest tile
        worker_shape = max((t.shape for t in tiles), key=lambda s: s[0] * s[1]) if tiles else shape
        self.pool = WorkerPool(config.inference, models, worker_shape, self.frames_address, self.results_address,
                               key_args=key_args)
        self.latest_frame: tuple[np.ndarray, dict] | None = None  # newest frame and its state
        self.moves: Counter[tuple[str, str]] = Counter()  # (actuator, source) → moves
        self._listeners: set[Callable[[], None]] = set()
        self.run: AcquisitionRun | None = None
        self.runs: dict[str, AcquisitionRun] = self._past_runs()
        self._start_lock = threading.Lock()
        self.results_loop = ResultsLoop(self.receiver, self.publisher, self.pool, self.engine, self.decisions,
                                        lambda: self.run, self.moves, config.safety.stale_after_s, self._notify,
                                        on_hold=self._on_hold)
        self.results_loop.start()

    # -- workers (the pool) and the results thread's view -----------------------

    def spawn_workers(self, n: int | None = None) -> None:
        self.pool.spawn(n)

    def wait_for_workers(self, n: int, timeout_s: float = 60.0) -> None:
        self.pool.wait(n, timeout_s)

    def worker_status(self) -> dict[str, dict[str, Any]]:
        return self.pool.status()

    def rejected_results(self) -> dict[str, int]:
        """Messages on the results socket that were not taken, by reason (never negative, never reset)."""
        refused = {"unauthorized_key": self.authorized_keys.refused} if self.authorized_keys else {}
        return {**{f"malformed_{k}": v for k, v in self.receiver.malformed.items()}, **self.results_loop.rejected,
                **refused, **{k: v for k, v in self.receiver.connections.items() if k != "disconnected"}}

    def transport_status(self) -> dict[str, Any]:
        """The results socket's guard and the pool's supervision, for /status."""
        return {"auth": self.config.transport.auth, "results_rejected": self.rejected_results(),
                "disconnections": self.receiver.connections["disconnected"],
                "worker_respawns": self.pool.respawns, "worker_exits": self.pool.exits[-10:],
                "frames": {"sent": self.publisher.sent, "replaced_while_workers_busy": self.publisher.replaced,
                           "send_failed": self.publisher.send_failed, "workers_ready": self.publisher.workers_ready,
                           "malformed_requests": dict(self.publisher.malformed), "tiled": self.publisher.tiled,
                           "tiles_per_frame": self.tiles_per_frame,
                           "tiled_frames_incomplete": self.results_loop.tiles.incomplete}}

    @property
    def latest(self) -> dict[str, Any] | None:
        return self.results_loop.latest

    @property
    def latest_result(self) -> dict[str, Any] | None:
        return self.results_loop.latest_result

    @property
    def results_seen(self) -> int:
        return self.results_loop.results_seen

    @property
    def latency_hist(self) -> LatencyHistogram:
        return self.results_loop.latency_hist

    # -- acquisitions ----------------------------------------------------------

    @property
    def storage_root(self) -> Path:
        return Path(self.config.storage.root)

    def check_plan(self, sequence: useq.MDASequence) -> CheckedPlan:
        """The plan as it will run, or PlanError naming the field (nothing moves)."""
        forget_iterated_plans()
        safety = self.config.safety
        stage_x_um, stage_y_um = safety.stage_x_um, safety.stage_y_um
        if self.scope is not None:  # the simulated stage's travel is the slide, unless the config narrows it
            max_x_um, max_y_um = self.scope.stage_range_um
            stage_x_um = stage_x_um or Range(min=0, max=max_x_um)
            stage_y_um = stage_y_um or Range(min=0, max=max_y_um)
        return check_plan(sequence, self.core, self.envelope, channel_group=self.core.getChannelGroup() or None,
                          stage_x_um=stage_x_um, stage_y_um=stage_y_um)

    def _past_runs(self, limit: int = RUNS_KEPT) -> dict[str, AcquisitionRun]:
        """The runs in storage.root from earlier daemons, oldest first (the newest `limit`); a run that an
        earlier daemon did not live to finish is listed as interrupted, with what is on disk."""
        root = self.storage_root
        folders = sorted((d for d in root.iterdir() if (d / "frames.csv").is_file()),
                         key=lambda d: (d / "frames.csv").stat().st_mtime)[-limit:] if root.is_dir() else []
        runs = {}
        for folder in folders:
            try:
                run = load_run(folder)
            except (OSError, ValueError) as e:
                log.warning("run folder %s could not be read: %s", folder, e)
                continue
            runs[run.id] = run
        return runs

    def start_acquisition(self, out_dir: Path | None = None, n_frames: int | None = None, *,
                          exposure_ms: float | None = None, interval_ms: float | None = None,
                          sequence: useq.MDASequence | None = None,
                          policies: list[str] | None = None, require_workers: bool | None = None) -> AcquisitionRun:
        """Start one acquisition in the background; Busy if one is running.

        `sequence`: any useq MDASequence (checked by `check_plan`), or the
        short form n_frames/interval_ms (a time-lapse; interval 0: as fast as
        the camera goes). `policies`: the ones that run (the others are
        disabled). `require_workers` (default inference.require_workers):
        NoWorkers unless an inference worker is live. A run that starts with
        one puts the lasers safe whenever inference is lost (see `_on_hold`);
        one that starts without leaves them alone (nothing to act on).
        Everything is checked before anything changes.
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
            live = any(w["state"] == "active" for w in self.pool.status().values())
            if not live and (self.config.inference.require_workers if require_workers is None else require_workers):
                raise NoWorkers("no inference worker is live (see /status workers): the policies would have "
                                "nothing to act on; wait for one, or start with require_workers false")
            run_id = uuid.uuid4().hex[:12]
            out_dir = Path(out_dir) if out_dir is not None else self.storage_root / run_id
            self._check_free_space(out_dir, plan.n_frames)
            out_dir.mkdir(parents=True, exist_ok=True)
            run = AcquisitionRun(id=run_id, n_frames=plan.n_frames, out_dir=out_dir, exposure_ms=exposure_ms,
                                 interval_ms=interval_ms, plan=plan,
                                 sequence=sequence.model_dump(mode="json", exclude_unset=True),
                                 decisions_at_start=self.decisions.count, inference_at_start=live)
            if policies is not None:
                for name in self.engine.slots:
                    self.engine.set_enabled(name, name in policies)
            # a plan that sets Z at every event keeps the focus policy's moves as per-position corrections
            self.engine.plan_relative = {"z_um": self._correct_focus} if sets_z(plan.sequence) else {}
            self.core.setExposure(exposure_ms)
            shape = (self.core.getImageHeight(), self.core.getImageWidth())
            dtype = np.uint16 if self.core.getBytesPerPixel() == 2 else np.uint8
            flat = is_time_lapse(plan.sequence)  # its length is the run's to decide: unbounded t
            run.writer = FrameWriter(out_dir, shape, dtype, self.camera.pixel_size_nm,
                                     sequence=None if flat else plan.sequence, format=self.config.storage.format,
                                     max_pending_bytes=self.config.storage.max_pending_mb * 1e6,
                                     summary_meta=summary_metadata(self.core, mda_sequence=plan.sequence))
            try:  # the files first, then the lasers: a run that cannot store starts nothing
                run.handler = FrameHandler(
                    acquisition_id=run.id, actuator=self.actuator, camera=self.camera, writer=run.writer,
                    publisher=self.publisher, infer_channel=self.config.inference.channel,
                    on_frame=lambda frame, index: setattr(self, "latest_frame", (frame, index)),
                    on_storage_error=lambda error: self._storage_failed(run, error))
                run.open_tables()
                self.decisions.set_file(out_dir / "decisions.jsonl")
                for name, value in initial.items():
                    self.actuator.write(name, value)
                self.actuator.refresh()
            except BaseException:
                self._set_safe()
                run.writer.close()
                raise
            self.engine.reset()
            self.run = run
            self.runs[run.id] = run
            while len(self.runs) > RUNS_KEPT:  # the oldest records go (their folders stay, listed at the next start)
                self.runs.pop(next(iter(self.runs)))
            threading.Thread(target=self._acquire, args=(run,), name=f"acq-{run.id}", daemon=True).start()
        self._notify()
        return run

    def _check_free_space(self, out_dir: Path, n_frames: int) -> None:
        """ValueError unless the disk holds every frame of the plan and storage.reserve_mb besides."""
        frame_bytes = self.core.getImageWidth() * self.core.getImageHeight() * self.core.getBytesPerPixel()
        need = n_frames * frame_bytes + self.config.storage.reserve_mb * 1e6
        probe = next(d for d in (out_dir, *out_dir.parents) if d.exists())
        free = shutil.disk_usage(probe).free
        if free < need:
            raise ValueError(f"the plan needs {need / 1e9:.3f} GB ({n_frames} frames of {frame_bytes} bytes, plus "
                             f"storage.reserve_mb {self.config.storage.reserve_mb}); {free / 1e9:.3f} GB free on "
                             f"{probe}: free some space or acquire fewer frames")

    def _on_hold(self, holding: bool) -> None:
        """The results thread saw the policy engine enter or leave its hold (no fresh inference result).

        With safety.on_inference_loss 'safe' the lasers go to their safe values for the hold and come back to
        where they were when fresh results return (a run that started without workers is left alone).
        """
        run = self.run
        if run is None or not run.inference_at_start or self.config.safety.on_inference_loss != "safe":
            return
        if holding and run.state == "acquiring" and not run.lasers_before_hold:
            run.lasers_before_hold = self._lasers_safe()
            log.error("acquisition %s: no fresh inference (%s); lasers safe until results return",
                      run.id, self.engine.hold_reason)
            self.decisions.append({"t_s": time.time(), "frame": run.counts.acquired - 1, "policy": None,
                                   "outcome": "lasers_safe", "values": run.lasers_before_hold,
                                   "reason": "inference lost: lasers at their safe values"})
        elif not holding and run.lasers_before_hold:
            saved, run.lasers_before_hold = run.lasers_before_hold, {}
            if run.state == "paused":  # resume brings them back
                run.saved_lasers.update(saved)
            elif run.state == "acquiring":  # ending: the lasers stay safe
                self._restore_lasers(saved)
                self.decisions.append({"t_s": time.time(), "frame": run.counts.acquired - 1, "policy": None,
                                       "outcome": "lasers_restored", "values": saved,
                                       "reason": "inference back: lasers restored to their values before the hold"})
                log.info("acquisition %s: inference back, lasers restored", run.id)

    def _correct_focus(self, _actuator: str, obs: Observation, delta_um: float) -> None:
        has_positions = self.run is not None and "p" in self.run.plan.sizes
        self.mda_engine.correct_focus(obs.index.get("p", 0) if has_positions else None, delta_um)

    def _acquire(self, run: AcquisitionRun) -> None:
        """Run the plan through pymmcore-plus's MDA runner, fed event by event (see EventFeed)."""
        steered = run.interval_ms is not None  # one planned interval: the frame-rate policy may steer it
        camera_paces = self.actuator.property_of("interval_ms") is not None
        feed = EventFeed(self.core, run.plan.sequence, camera_paces=camera_paces,
                         interval_ms=(lambda: self.actuator.snapshot()["interval_ms"]) if steered else (lambda: None),
                         delivered=lambda: run.handler.counts.delivered,
                         burst_frames=self.config.acquisition.burst_frames)
        run.bursts = feed.bursts
        self.mda_engine.plan = run.plan.sequence
        frame_ready = self.core.mda.events.frameReady
        frame_ready.connect(run.handler.frameReady)
        try:
            self.core.mda.run(iter(feed))
            outcome = "errored" if run.error else "cancelled" if run.stop.is_set() else "finished"
        except Exception as e:  # the run fails; the daemon lives on
            log.exception("acquisition %s failed", run.id)
            run.error, outcome = f"{type(e).__name__}: {e}", "errored"
        finally:
            frame_ready.disconnect(run.handler.frameReady)
            self.mda_engine.plan = None
            self._stop_camera_sequence()
        run.state = "finishing"
        try:
            self._drain(run)
            run.handler.withdraw_waiting()
            if outcome == "finished" and self.config.inference.catch_up and self.config.inference.model:
                self._catch_up(run)
        finally:  # whatever fails here, the lasers go safe and the run ends (the daemon is never left busy)
            self._set_safe()
            try:
                self._finish(run, outcome)
            finally:
                run.done.set()

    def _catch_up(self, run: AcquisitionRun, quiet_s: float = 30.0) -> None:
        """Lasers safe, every frame on disk, then the frames the live stream did not infer go to the workers
        (acquisition/catch_up.py); waits for their results while they keep coming. A stop ends it."""
        if not self._workers_alive() or run.inferred >= run.counts.acquired:
            return
        self._set_safe()
        try:
            run.writer.close()
        except RuntimeError:
            return  # storage failed: close_files reports it, there is nothing to read back
        run.catch_up = catch_up(run, self.publisher, self.camera, infer_channel=self.config.inference.channel,
                                workers_alive=self._workers_alive, abandon=run.stop.is_set)
        answered, last_progress_s = -1, time.time()
        while run.inferred_catch_up < run.catch_up["frames_offered"] and not run.stop.is_set() \
                and time.time() - last_progress_s < quiet_s and self._workers_alive():
            if run.inferred_catch_up != answered:
                answered, last_progress_s = run.inferred_catch_up, time.time()
            time.sleep(0.05)
        run.catch_up["frames_inferred"] = run.inferred_catch_up

    def _stop_camera_sequence(self) -> None:
        """No camera sequence outlives its run: a stop that lands just as a burst starts can miss it, and the
        camera then fills its buffer for nothing (found by fuzzing: 1.4 GB, frames no one reads)."""
        try:
            if self.core.isSequenceRunning():
                self.core.stopSequenceAcquisition()
            self.core.clearCircularBuffer()
        except Exception:
            log.exception("could not stop the camera's sequence")

    def _storage_failed(self, run: AcquisitionRun, error: BaseException) -> None:
        """The frame writer died (e.g. the disk is full): stop the run now, exposing nothing more for nothing."""
        log.error("acquisition %s: storage failed (%s); stopping the run", run.id, error)
        run.error = f"storage failed: {error}"
        run.stop.set()
        self.core.mda.cancel()
        if self.core.isSequenceRunning():
            self.core.stopSequenceAcquisition()

    def _drain(self, run: AcquisitionRun, timeout_s: float = 3.0) -> None:
        """Give in-flight inference results a moment to arrive before closing."""
        deadline = time.time() + timeout_s
        while (run.inferred + run.skipped < run.counts.published and time.time() < deadline
               and self._workers_alive()):
            time.sleep(0.02)

    def _workers_alive(self) -> bool:
        """Whether any worker is active (heard from recently): results may still come."""
        return any(w["state"] == "active" for w in self.pool.status().values())

    def _finish(self, run: AcquisitionRun, outcome: str) -> None:
        run.close_files(outcome, self._summary)
        self.decisions.set_file(None)
        try:  # summary.json and the report are views of the run: failing to write them (a full disk) fails nothing
            (run.out_dir / "summary.json").write_text(json.dumps(run.summary, indent=2))
            from smartscope.report import write_report

            write_report(run.out_dir)
        except Exception as e:
            log.exception("could not write the summary or the report of %s", run.id)
            run.report_error = f"{type(e).__name__}: {e}"
            run.summary["report_error"] = run.report_error
            with contextlib.suppress(OSError):
                (run.out_dir / "summary.json").write_text(json.dumps(run.summary, indent=2))
        run.keep_record_only()
        forget_iterated_plans()
        release_free_memory(collect_garbage=True)
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
        paused_since_s = None
        while not run.done.is_set() and time.time() < deadline:
            status = runner.status
            if status.phase == RunState.PAUSED:
                # confirmed over more than the runner's pause poll: a pause set just as the runner starts an
                # event is overwritten by it (pymmcore-plus sets ACQUIRING after the wait), and is then asked again
                paused_since_s = paused_since_s or time.time()
                if time.time() - paused_since_s > 0.15:
                    break
            else:
                paused_since_s = None
                if not status.pause_requested:
                    runner.set_paused(True)  # again: a runner still preparing ignores it
                if run.bursts and self.core.isSequenceRunning():
                    self.core.stopSequenceAcquisition()  # a burst stops at once; its rest runs on resume
            time.sleep(0.005)
        if run.done.is_set():
            return run
        run.saved_lasers = self._lasers_safe()
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
        self._restore_lasers(run.saved_lasers)
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

    def _lasers_safe(self) -> dict[str, float | None]:
        """Every actuator to its safe value; returns the lasers' powers before, for `_restore_lasers`."""
        lasers = [n for n in ("activation_mw", "excitation_mw") if n in self.actuator.available()]
        before = {n: self.actuator.snapshot()[n] for n in lasers}
        self._set_safe()
        return before

    def _restore_lasers(self, powers: dict[str, float | None]) -> None:
        for name, value in powers.items():
            if value is not None:
                self.actuator.write(name, value)

    def _set_safe(self) -> None:
        """Lasers (and anything else with a safe value) to their safe value."""
        for name in self.actuator.available():
            safe = self.envelope.limits(name).safe_value
            if safe is not None:
                try:
                    self.actuator.write(name, safe)
                except Exception:  # keep going: the other lasers still need to go safe
                    log.exception("could not set %s to its safe value", name)

    # -- reporting -------------------------------------------------------------

    def _summary(self, run: AcquisitionRun) -> dict[str, Any]:
        return summarize(run, workers=self.pool.status(), engine=self.engine, decisions_total=self.decisions.count,
                         malformed_results=dict(self.receiver.malformed),
                         frame_ring=self.publisher.ring.stats() if self.publisher.ring else None)

    def status(self) -> dict[str, Any]:
        run = self.run
        workers = self.pool.status()
        base = {"state": "idle" if run is None else run.state,
                "provider": sorted({w["provider"] for w in workers.values() if w["state"] == "active"}),
                "workers": workers, "transport": self.transport_status(), "hold": self.engine.hold_reason,
                "engine": self.engine.status(),
                "actuators": self.actuator.snapshot(), "latest": self.latest}
        if run is not None:
            summary = run.summary if run.summary is not None else self._summary(run)  # None until it ends
            base.update({"acquisition": run.id, **{k: v for k, v in summary.items()
                                                   if k.startswith(("frames", "latency", "actions", "local"))},
                         "frames_pending_storage": run.writer.pending if run.writer else 0})
        return base

    # -- shutdown --------------------------------------------------------------

    def close(self) -> None:
        """Stop the run (files flushed and closed), lasers safe, workers told to exit, sockets closed."""
        self.stop_acquisition(wait_s=60)
        self._set_safe()
        self.pool.stop()
        self.results_loop.close()
        self.publisher.close()
        self.receiver.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.zmq_context.term()
