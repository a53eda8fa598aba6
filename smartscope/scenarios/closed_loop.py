"""The closed loop itself: the daemon's acquisition path and policy engine, in one process.

The same parts as the daemon, minus the sockets: the core from
`smartscope.hardware.build_core` (simulated devices, not paced in real time,
every frame's ground truth kept), frames acquired by pymmcore-plus's MDA
runner with smartscope's `SmartEngine` and `EventFeed` (as the daemon's
`_acquire` does), the shipped localization model run in-process on each
frame, and the real `PolicyEngine` + `SafetyEnvelope` + `Actuator` acting on
the core between frames. Time is the simulation's clock, so a run is
deterministic for a seed and as fast as the CPU allows (about 6 ms a frame at
64 × 64 px, 0.2 ms of it the runner's).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import useq

from smartscope.acquisition import EventFeed, SmartEngine
from smartscope.acquisition.feed import ORDINAL
from smartscope.acquisition.plan import time_lapse
from smartscope.config import PolicySpec, SmartscopeConfig
from smartscope.control.actuator import Actuator
from smartscope.control.decisions import DecisionLog
from smartscope.control.engine import PolicyEngine, build_policies
from smartscope.control.policy import Observation
from smartscope.control.safety import SafetyEnvelope
from smartscope.hardware import build_core
from smartscope.transport.protocol import LOCALIZATION_COLUMNS, CameraParams

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

    from smartscope.inference.session import LoadedModel
    from smartscope.simulation.microscope import FrameTruth, SimulatedMicroscope

EventScore = Callable[[np.ndarray, "FrameTruth", np.random.Generator], float | None]


# -- the shipped models, run as the worker runs them ---------------------------------------


@functools.cache
def shipped_model(name: str = "localization.onnx") -> LoadedModel:
    """A shipped model (the localizer by default) on the CPU, one thread (deterministic, shares the machine)."""
    from smartscope.inference.session import load_model

    return load_model(name, "cpu", threads=1)


def _model_available(name: str) -> bool:
    from smartscope.resources import resolve_model_path

    try:
        return resolve_model_path(name).is_file()
    except Exception:  # noqa: BLE001 - any failure to find it means: not available
        return False


def counting_model_available(name: str = "counting.onnx") -> bool:
    return _model_available(name)


def live_mode_available() -> bool:
    """The simulation's live mode (tubular network with fission events) is installed."""
    from smartscope.simulation.config import SimulationConfig

    return "mode" in SimulationConfig.model_fields and "live" in SimulationConfig.model_fields


def event_model_available(name: str = "events.onnx") -> bool:
    return _model_available(name) and live_mode_available()


def camera_of(config: SmartscopeConfig) -> CameraParams:
    return CameraParams.model_validate(config.simulation.camera, from_attributes=True)


def counting_model_counter(config: SmartscopeConfig,
                           name: str = "counting.onnx") -> Callable[[np.ndarray], float | None]:
    """Per-frame emitter count from the shipped counting model, as the worker computes it.

    Stateful: keeps the model's window of consecutive frames (photons) and
    returns None until the window is full.
    """
    from smartscope.inference.counting import count_frame
    from smartscope.simulation.camera import adu_to_photons

    model = shipped_model(name)
    camera = camera_of(config)
    window: deque[np.ndarray] = deque(maxlen=int(model.card["frames"]))

    def count(frame_adu: np.ndarray) -> float | None:
        window.append(adu_to_photons(frame_adu, camera))
        if len(window) < window.maxlen:
            return None
        return float(len(count_frame(model, np.stack(window))))

    return count


def event_model_scorer(config: SmartscopeConfig, name: str = "events.onnx") -> EventScore:
    """The shipped event model's per-frame score, computed as the worker computes it.

    Stateful: the model's causal window (`EventWindow`: keyframes the card's
    `window_spacing_ms` apart, photons); the score is the event map's maximum,
    kept only where the maps of the card's `min_frames` − 1 previous frames
    also saw something nearby. None until the card's window exists (`event_window_for`).
    """
    from smartscope.inference.events import event_map, event_window_for, persistent_score, previous_maps_for
    from smartscope.simulation.camera import adu_to_photons

    model = shipped_model(name)
    camera = camera_of(config)
    window = event_window_for(model.card)
    previous: deque[np.ndarray] = deque(maxlen=previous_maps_for(model.card))

    def score(frame_adu: np.ndarray, truth: FrameTruth, rng: np.random.Generator) -> float | None:
        frames = window.push(0, truth.t_s, adu_to_photons(frame_adu, camera))
        if frames is None:
            return None
        current = event_map(model, frames)
        value = persistent_score(current, list(previous) if len(previous) == previous.maxlen else [])
        if previous.maxlen:
            previous.append(current)
        return value

    return score


# -- the loop -------------------------------------------------------------------------------


def base_config(*, seed: int = 0, size_px: int = 64, exposure_ms: float = 20.0,
                interval_ms: float = 20.0, activation_mw: float = 50.0,
                excitation_mw: float = 50.0) -> SmartscopeConfig:
    """Simulated hardware, no real-time pacing, truth kept; no policies yet."""
    cfg = SmartscopeConfig()
    cfg.hardware.mode = "simulated"
    cfg.hardware.realtime = False
    cfg.hardware.keep_truth = True
    cfg.hardware.seed = seed
    cfg.simulation.camera.width_px = cfg.simulation.camera.height_px = size_px
    cfg.acquisition.exposure_ms = exposure_ms
    cfg.acquisition.interval_ms = interval_ms
    cfg.acquisition.activation_mw = activation_mw
    cfg.acquisition.excitation_mw = excitation_mw
    return cfg


@dataclass
class ClosedLoopRun:
    """Per-frame record of one run: truth, what inference saw, actuator state at capture."""

    truths: list[FrameTruth]
    n_localizations: np.ndarray  # (T,) int
    localizations: list[np.ndarray]  # T arrays (N, 7), LOCALIZATION_COLUMNS
    states: dict[str, np.ndarray]  # actuator (and x_um, y_um: the plan's stage) -> (T,) value at capture (NaN: none)
    t_s: np.ndarray  # (T,) simulation time at the start of each exposure
    decisions: list[dict[str, Any]]
    engine: PolicyEngine
    writes: list[tuple[float, str, float]] = field(default_factory=list)  # (t_s, actuator, value)
    holding: np.ndarray | None = None  # (T,) bool: engine in hold after this frame
    bleached_fraction: float = 0.0  # of all molecules, at the end
    emitter_counts: np.ndarray | None = None  # (T,) the emitter_count hook's values (NaN: none)

    @property
    def focus_offset_nm(self) -> np.ndarray:
        return np.array([t.focus_offset_nm for t in self.truths])

    @property
    def true_emitters(self) -> np.ndarray:
        return np.array([t.id.size for t in self.truths])


class _RecordingActuator(Actuator):
    """The real actuator, also recording every write with the simulation time."""

    clock_s = 0.0

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.writes: list[tuple[float, str, float]] = []

    def write(self, name: str, value: float) -> None:
        super().write(name, value)
        self.writes.append((self.clock_s, name, float(value)))


@dataclass
class _FrameLoop:
    """The per-frame work, on the MDA runner's frameReady: infer, observe, let the policies act, record.

    Runs synchronously in the runner's thread, between one frame and the next
    event (one frame per event), so the policies' actions reach the very next
    frame. The runner logs and swallows a listener's exception, so one is
    kept here, the run cancelled and the exception raised again by the caller.
    The options are run_closed_loop's.
    """

    core: CMMCorePlus
    scope: SimulatedMicroscope
    actuator: _RecordingActuator
    engine: PolicyEngine
    model: LoadedModel | None
    camera: CameraParams
    threshold: float
    rng: np.random.Generator
    latency_s: float
    delivered: Callable[[int], bool] | None
    event_score: EventScore | None
    emitter_count: Callable[[np.ndarray], float | None] | None
    until: Callable[[FrameTruth], bool] | None
    ordinal: int = -1  # of the newest frame handled, for the feed's `delivered`
    error: BaseException | None = None
    counts: list[int] = field(default_factory=list)
    model_counts: list[float] = field(default_factory=list)
    localizations: list[np.ndarray] = field(default_factory=list)
    t_s: list[float] = field(default_factory=list)
    holding: list[bool] = field(default_factory=list)
    states: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._area_um2 = self.scope.shape[0] * self.scope.shape[1] * (self.camera.pixel_size_nm / 1000) ** 2
        # the localizer's window of recent frames
        self._recent: deque[np.ndarray] = deque(maxlen=int(self.model.card.get("frames", 1)) if self.model else 1)

    def frameReady(self, frame: np.ndarray, event: useq.MDAEvent, meta: dict[str, Any]) -> None:  # noqa: N802
        self.ordinal = event.metadata[ORDINAL]
        try:
            self._step(frame)
        except BaseException as e:  # noqa: BLE001 - raised again by run_closed_loop
            self.error = e
            self.core.mda.cancel()

    def _step(self, frame: np.ndarray) -> None:
        from smartscope.inference.localization import localize_frame

        i = self.ordinal
        state = self.actuator.snapshot()  # as at capture: the engine acts only below
        for k, v in state.items():
            self.states.setdefault(k, []).append(np.nan if v is None else v)
        truth = self.scope.truth_log[-1]
        now_s = truth.t_s + truth.exposure_ms / 1000 + self.latency_s
        self.actuator.clock_s = now_s
        self._recent.append(frame)
        if self.model is not None:
            locs, background = localize_frame(self.model, np.stack(self._recent), self.camera,
                                              threshold=self.threshold)
        else:
            locs, background = np.empty((0, len(LOCALIZATION_COLUMNS))), None
        self.counts.append(len(locs))
        self.localizations.append(locs)
        self.t_s.append(truth.t_s)
        model_count = None if self.emitter_count is None else self.emitter_count(frame)
        self.model_counts.append(np.nan if model_count is None else model_count)
        if self.delivered is None or self.delivered(i):
            obs = Observation(
                seq=i, t_capture_s=truth.t_s, n_emitters=len(locs), localizations=locs,
                background_photons=background, state=state, field_area_um2=self._area_um2,
                event_score=None if self.event_score is None else self.event_score(frame, truth, self.rng),
                emitter_count=model_count)
            self.engine.on_observation(obs, now_s)
        else:
            self.engine.check_stale(now_s)
        self.holding.append(self.engine.hold_reason is not None)
        if self.until is not None and self.until(truth):
            self.core.mda.cancel()  # at this event's end: no frame after this one


def run_closed_loop(
    config: SmartscopeConfig,
    policies: Sequence[PolicySpec | dict[str, Any]],
    n_frames: int,
    *,
    latency_s: float = 0.005,
    delivered: Callable[[int], bool] | None = None,
    event_score: EventScore | None = None,
    emitter_count: Callable[[np.ndarray], float | None] | None = None,
    threshold: float | None = None,
    initial: dict[str, float] | None = None,
    setup: Callable[[SimulatedMicroscope], None] | None = None,
    localize: bool = True,
    until: Callable[[FrameTruth], bool] | None = None,
) -> ClosedLoopRun:
    """Acquire `n_frames` with the policies acting between frames.

    The frames are a time-lapse (interval 0: the simulated camera's
    Interval-ms paces the simulation's clock) run by pymmcore-plus's MDA
    runner, one frame per event, so each frame is handled before the next is
    taken. Each frame: the state at capture is stamped, the frame is
    localized; its result reaches the engine `latency_s` after the exposure
    ends (simulation time) unless `delivered(frame)` is False (a worker that
    is gone): then only the engine's staleness watchdog runs.
    `event_score(frame_adu, truth, rng)` fills `Observation.event_score` (the
    event model, or a stand-in made from the truth) and `emitter_count(frame_adu)` fills
    `Observation.emitter_count` (e.g. `counting_model_counter`); None: the
    field stays None, as when that model does not run.
    `initial` sets actuators before the first frame (the set-up, not a decision);
    `setup(scope)` may change the simulated sample before the first frame
    (e.g. mount it tilted). `localize=False` skips the localizer (live mode,
    where the policies under test read only the event score). `until(truth)`
    ends the run early (the runner is cancelled), after the frame for which it is True.
    """
    specs = [p if isinstance(p, PolicySpec) else PolicySpec(**p) for p in policies]
    config = config.model_copy(deep=True)
    config.policies = specs
    core, scope = build_core(config)
    assert scope is not None, "scenarios need hardware.mode = simulated"
    if setup is not None:
        setup(scope)
    actuator = _RecordingActuator(core, config.hardware.devices)
    acq = config.acquisition
    for name, value in (("activation_mw", acq.activation_mw), ("excitation_mw", acq.excitation_mw),
                        ("interval_ms", acq.interval_ms), *(initial or {}).items()):
        if value is not None and name in actuator.available():
            actuator.write(name, value)
    actuator.writes.clear()
    log = DecisionLog(keep=10**7)
    engine = PolicyEngine(build_policies(specs), SafetyEnvelope(config.safety), actuator, log,
                          config.safety.stale_after_s)
    engine.reset(now_s=0.0)
    loop = _FrameLoop(
        core=core, scope=scope, actuator=actuator, engine=engine,
        model=shipped_model(config.inference.model) if localize else None, camera=camera_of(config),
        threshold=config.inference.detection_threshold if threshold is None else threshold,
        rng=np.random.default_rng([config.hardware.seed, 7]), latency_s=latency_s, delivered=delivered,
        event_score=event_score, emitter_count=emitter_count, until=until)
    sequence = time_lapse(n_frames, 0)
    mda_engine = SmartEngine(core, actuator)
    mda_engine.plan = sequence
    core.mda.set_engine(mda_engine)
    # camera-paced, one frame a burst: the runner never waits (simulation time), and each frame's
    # inference and actions come before the next frame
    feed = EventFeed(core, sequence, interval_ms=lambda: None, camera_paces=True,
                     delivered=lambda: loop.ordinal, burst_frames=1)
    core.mda.events.frameReady.connect(loop.frameReady)
    core.mda.run(iter(feed))
    if loop.error is not None:
        raise loop.error
    return ClosedLoopRun(
        truths=list(scope.truth_log), n_localizations=np.asarray(loop.counts), localizations=loop.localizations,
        emitter_counts=np.asarray(loop.model_counts, dtype=float),
        states={k: np.asarray(v, dtype=float) for k, v in loop.states.items()}, t_s=np.asarray(loop.t_s),
        decisions=log.recent(10**7), engine=engine, writes=actuator.writes,
        holding=np.asarray(loop.holding), bleached_fraction=scope.bleached_fraction)
