"""Closed-loop scenarios on the simulated microscope, in one process.

The same parts as the daemon, minus the sockets: the core from
`smartscope.hardware.build_core` (simulated devices, not paced in real time,
every frame's ground truth kept), frames snapped through the Micro-Manager
API, the shipped localization model run in-process, and the real
`PolicyEngine` + `SafetyEnvelope` + `Actuator` acting on the core between
frames. Time is the simulation's clock, so a run is deterministic for a seed
and as fast as the CPU allows (about 5 ms a frame at 64 × 64 px).

`run_closed_loop` is the loop; the scenario functions below set up one
policy's situation (bleaching, drift, a tilted sample, events), run it with
the policy and with fixed settings, and score both against the simulation's
ground truth. `smartscope bench policies` and tests/test_policies.py call
exactly these.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from smartscope.config import PolicySpec, SmartscopeConfig
from smartscope.control.actuator import Actuator
from smartscope.control.decisions import DecisionLog
from smartscope.control.engine import PolicyEngine, build_policies
from smartscope.control.policy import Observation
from smartscope.control.safety import SafetyEnvelope
from smartscope.hardware import build_core
from smartscope.simulation.microscope import FrameTruth, SimulatedMicroscope
from smartscope.simulation.sample import rotate_positions
from smartscope.transport.protocol import LOCALIZATION_COLUMNS, CameraParams

# -- the loop -------------------------------------------------------------------------


@functools.cache
def shipped_model(name: str = "localization.onnx"):
    """A shipped model (the localizer by default) on the CPU, one thread (deterministic, shares the machine)."""
    from smartscope.inference.session import load_model

    return load_model(name, "cpu", threads=1)


def counting_model_counter(config: SmartscopeConfig,
                           name: str = "counting.onnx") -> Callable[[np.ndarray], float | None]:
    """Per-frame emitter count from the shipped counting model, as the worker computes it.

    Stateful: keeps the model's window of consecutive frames (photons) and
    returns None until the window is full.
    """
    from collections import deque

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
    states: dict[str, np.ndarray]  # actuator -> (T,) value at capture (NaN: none)
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


def camera_of(config: SmartscopeConfig) -> CameraParams:
    cam = config.simulation.camera
    return CameraParams(pixel_size_nm=cam.pixel_size_nm, offset_adu=cam.offset_adu,
                        e_per_adu=cam.e_per_adu, qe=cam.qe, em_gain=cam.em_gain)


def run_closed_loop(
    config: SmartscopeConfig,
    policies: Sequence[PolicySpec | dict[str, Any]],
    n_frames: int,
    *,
    latency_s: float = 0.005,
    delivered: Callable[[int], bool] | None = None,
    event_score: Callable[[np.ndarray, FrameTruth, np.random.Generator], float | None] | None = None,
    emitter_count: Callable[[np.ndarray], float | None] | None = None,
    threshold: float | None = None,
    initial: dict[str, float] | None = None,
    setup: Callable[[SimulatedMicroscope], None] | None = None,
    localize: bool = True,
    until: Callable[[FrameTruth], bool] | None = None,
) -> ClosedLoopRun:
    """Acquire `n_frames` with the policies acting between frames.

    Each frame: the state at capture is stamped, the frame is snapped through
    the core and localized; its result reaches the engine `latency_s` after the
    exposure ends (simulation time) unless `delivered(frame)` is False (a
    worker that is gone): then only the engine's staleness watchdog runs.
    `event_score(frame_adu, truth, rng)` fills `Observation.event_score` (the
    event model, or a stand-in made from the truth) and `emitter_count(frame_adu)` fills
    `Observation.emitter_count` (e.g. `counting_model_counter`); None: the
    field stays None, as when that model does not run.
    `initial` sets actuators before the first frame (the set-up, not a decision);
    `setup(scope)` may change the simulated sample before the first frame
    (e.g. mount it tilted). `localize=False` skips the localizer (live mode,
    where the policies under test read only the event score). `until(truth)`
    ends the run early, after the frame for which it is True.
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
    model = shipped_model(config.inference.model) if localize else None
    camera = camera_of(config)
    threshold = config.inference.detection_threshold if threshold is None else threshold
    rng = np.random.default_rng([config.hardware.seed, 7])
    area_um2 = scope.shape[0] * scope.shape[1] * (camera.pixel_size_nm / 1000) ** 2

    from smartscope.inference.localization import localize_frame

    counts, model_counts, all_locs, times, holding = [], [], [], [], []
    recent: deque[np.ndarray] = deque(maxlen=int(model.card.get("frames", 1)) if model else 1)  # its window
    states: dict[str, list[float]] = {k: [] for k in actuator.snapshot()}
    for i in range(n_frames):
        state = actuator.snapshot()
        for k, v in state.items():
            states[k].append(np.nan if v is None else v)
        core.snapImage()
        frame = core.getImage()
        truth = scope.truth_log[-1]
        now_s = truth.t_s + truth.exposure_ms / 1000 + latency_s
        actuator.clock_s = now_s
        recent.append(frame)
        if localize:
            locs, background = localize_frame(model, np.stack(recent), camera, threshold=threshold)
        else:
            locs, background = np.empty((0, len(LOCALIZATION_COLUMNS))), None
        counts.append(len(locs))
        all_locs.append(locs)
        times.append(truth.t_s)
        model_count = None if emitter_count is None else emitter_count(frame)
        model_counts.append(np.nan if model_count is None else model_count)
        if delivered is None or delivered(i):
            obs = Observation(
                seq=i, t_capture_s=truth.t_s, n_emitters=len(locs), localizations=locs,
                background_photons=background, state=state, field_area_um2=area_um2,
                event_score=None if event_score is None else event_score(frame, truth, rng),
                emitter_count=model_count)
            engine.on_observation(obs, now_s)
        else:
            engine.check_stale(now_s)
        holding.append(engine.hold_reason is not None)
        if until is not None and until(truth):
            break
    return ClosedLoopRun(
        truths=list(scope.truth_log), n_localizations=np.asarray(counts), localizations=all_locs,
        emitter_counts=np.asarray(model_counts, dtype=float),
        states={k: np.asarray(v, dtype=float) for k, v in states.items()}, t_s=np.asarray(times),
        decisions=log.recent(10**7), engine=engine, writes=actuator.writes,
        holding=np.asarray(holding), bleached_fraction=scope.bleached_fraction)


# -- metrics ------------------------------------------------------------------------------


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` frames: element i averages x[i-window+1 .. i]; NaN before.

    NaN values (no count for that frame) are left out of their windows.
    """
    x = np.asarray(x, dtype=float)
    out = np.full(x.size, np.nan)
    if x.size >= window:
        valid = np.isfinite(x)
        c = np.cumsum(np.concatenate([[0.0], np.where(valid, x, 0.0)]))
        n = np.cumsum(np.concatenate([[0], valid.astype(int)]))
        sums, counts = c[window:] - c[:-window], n[window:] - n[:-window]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[window - 1:] = np.where(counts > 0, sums / counts, np.nan)
    return out


def settling_frame(relative_error: np.ndarray, tolerance: float, hold_frames: int) -> int | None:
    """First frame from which |error| stays ≤ tolerance for `hold_frames` frames (or to the end).

    None if that never happens.
    """
    ok = np.abs(np.nan_to_num(np.asarray(relative_error, dtype=float), nan=np.inf)) <= tolerance
    runs = np.zeros(ok.size + 1, dtype=int)  # runs[i]: ok frames in a row from i
    for i in range(ok.size - 1, -1, -1):
        runs[i] = runs[i + 1] + 1 if ok[i] else 0
    for i in range(ok.size):
        if runs[i] > 0 and runs[i] >= min(hold_frames, ok.size - i):
            return i
    return None


# -- 1. illumination: hold emitters per frame while the dye bleaches -------------------------

ILLUMINATION_FIXED_MW = (10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0)
ILLUMINATION_FIXED_MW_COUNTING = (30.0, 45.0, 60.0, 90.0)  # around the best; the counting model costs ~10 ms/frame


def counting_model_available(name: str = "counting.onnx") -> bool:
    return _model_available(name)


def event_model_available(name: str = "events.onnx") -> bool:
    return _model_available(name) and live_mode_available()


def _model_available(name: str) -> bool:
    from smartscope.resources import resolve_model_path

    try:
        return resolve_model_path(name).is_file()
    except Exception:  # noqa: BLE001 - any failure to find it means: not available
        return False


def bleaching_config(seed: int, *, size_px: int = 64, activation_mw: float = 5.0,
                     bleach_factor: float = 4.0) -> SmartscopeConfig:
    """A densely labelled sample whose dye bleaches `bleach_factor` × faster than the default."""
    cfg = base_config(seed=seed, size_px=size_px, activation_mw=activation_mw)
    sample = cfg.simulation.sample
    sample.n_filaments, sample.labels_per_um, sample.z_range_nm = 6, 300.0, 400.0
    cfg.simulation.photophysics.bleach_per_photon *= bleach_factor
    return cfg


def density_error(counts: np.ndarray, set_point: float, window: int) -> np.ndarray:
    """Relative error of the `window`-frame trailing mean count vs the set point (NaN at first)."""
    return (rolling_mean(counts, window) - set_point) / set_point


def illumination_scenario(seed: int = 0, *, n_frames: int = 1500, size_px: int = 64,
                          set_point: float = 12.0, start_mw: float = 5.0,
                          fixed_mw: Sequence[float] = ILLUMINATION_FIXED_MW, window: int = 50,
                          tolerance: float = 0.1, hold_frames: int = 100,
                          bleach_factor: float = 4.0, signal: str = "localizations",
                          params: dict[str, Any] | None = None) -> dict[str, Any]:
    """PI on the activation laser vs every fixed power in `fixed_mw`, same sample and seed.

    `signal` is the policy's input and the counted quantity: "localizations"
    per frame, or "counting_model" (the shipped counting model's per-frame
    count, run in the loop as the worker runs it).

    The score is the median |error| / set point of the localizations per frame
    averaged over `window` frames (single-frame counts carry Poisson noise of
    1/√n: 29 % at 12 emitters), from the policy's settling frame (first frame
    after which it stays within `tolerance` for `hold_frames`) to the end. The
    fixed powers are scored over the same frames; the best fixed power is the
    one with the least median error.

    true_median_abs_error scores the emitters truly on per frame the same way:
    what the sample saw, whatever the counted signal's bias (counted_over_true,
    its mean over the true mean over the same frames).
    """
    spec = {"name": "illumination", "module": "policies.illumination",
            "params": {"set_point_emitters": set_point, "signal": signal, **(params or {})}}

    def loop(mw: float, policies: list[dict[str, Any]]) -> tuple[ClosedLoopRun, np.ndarray]:
        cfg = bleaching_config(seed, size_px=size_px, activation_mw=mw, bleach_factor=bleach_factor)
        counter = counting_model_counter(cfg) if signal == "counting_model" else None
        r = run_closed_loop(cfg, policies, n_frames, emitter_count=counter)
        return r, (r.emitter_counts if counter is not None else r.n_localizations)

    run, counted = loop(start_mw, [spec])
    err = density_error(counted, set_point, window)
    true_on = run.true_emitters.astype(float)
    true_err = density_error(true_on, set_point, window)
    settle = settling_frame(err, tolerance, hold_frames)
    start = settle if settle is not None else window - 1
    fixed = {}
    for mw in fixed_mw:
        _, c = loop(mw, [])
        e = density_error(c, set_point, window)
        fixed[mw] = {"median_abs_error": float(np.nanmedian(np.abs(e[start:]))),
                     "p90_abs_error": float(np.nanpercentile(np.abs(e[start:]), 90)),
                     "first_mean": float(np.nanmean(c[:window])),
                     "last_mean": float(np.nanmean(c[-window:]))}
    best_mw = min(fixed, key=lambda mw: fixed[mw]["median_abs_error"])
    power = run.states["activation_mw"]
    return {
        "seed": seed, "signal": signal, "set_point": set_point, "frames": n_frames,
        "settling_frames": settle,
        "median_abs_error": float(np.nanmedian(np.abs(err[start:]))),
        "p90_abs_error": float(np.nanpercentile(np.abs(err[start:]), 90)),
        "true_median_abs_error": float(np.nanmedian(np.abs(true_err[start:]))),
        "counted_over_true": float(np.nanmean(counted[start:]) / np.mean(true_on[start:])),
        "power_mw_start_end": [float(power[start]), float(power[-1])],
        "bleached_fraction": run.bleached_fraction,
        "best_fixed_mw": best_mw,
        "best_fixed_median_abs_error": fixed[best_mw]["median_abs_error"],
        "best_fixed_p90_abs_error": fixed[best_mw]["p90_abs_error"],
        "fixed": {f"{mw:g}": v for mw, v in fixed.items()},
        "actions": int(run.engine.actions.get("illumination", 0)),
    }



# -- 2. frame rate: fast during fission events, slow otherwise -----------------------------------


def live_mode_available() -> bool:
    """The simulation's live mode (tubular network with fission events) is installed."""
    from smartscope.simulation.config import SimulationConfig

    return "mode" in SimulationConfig.model_fields and "live" in SimulationConfig.model_fields


def live_config(seed: int, *, size_px: int = 96, exposure_ms: float = 20.0, slow_interval_ms: float = 100.0,
                fission_rate_per_um_per_s: float | None = None) -> SmartscopeConfig:
    """Live mode (mitochondria-like network, fission events), starting at the slow rate."""
    cfg = base_config(seed=seed, size_px=size_px, exposure_ms=exposure_ms, interval_ms=slow_interval_ms,
                      activation_mw=0.0)
    cfg.simulation.mode = "live"
    if fission_rate_per_um_per_s is not None:
        cfg.simulation.live.fission_rate_per_um_per_s = fission_rate_per_um_per_s
    return cfg


def truth_event_score(detection_delay_s: float = 0.25, noise: float = 0.1,
                      ) -> Callable[[FrameTruth, np.random.Generator], float]:
    """A stand-in for the event model, made from the simulation's truth (not a model!).

    Score 0.9 for a frame showing a fission event that began at least
    `detection_delay_s` before the frame, else 0.1, plus Gaussian noise of sd
    `noise`, clipped to 0..1: a detector that sees an event a little after it
    starts and sometimes fires on nothing.
    """

    def score(frame_adu: np.ndarray, truth: FrameTruth, rng: np.random.Generator) -> float:
        t_mid = truth.t_s + 0.5 * truth.exposure_ms / 1000
        seen = any(t_mid - ev.onset_s >= detection_delay_s for ev in getattr(truth, "events", []))
        return float(np.clip((0.9 if seen else 0.1) + noise * rng.normal(), 0.0, 1.0))

    return score


def event_model_scorer(config: SmartscopeConfig, name: str = "events.onnx",
                       ) -> Callable[[np.ndarray, FrameTruth, np.random.Generator], float | None]:
    """The shipped event model's per-frame score, computed as the worker computes it.

    Stateful: the model's causal window (`EventWindow`: keyframes the card's
    `window_spacing_ms` apart, photons); the score is the event map's maximum,
    kept only where the maps of the card's `min_frames` − 1 previous frames
    also saw something nearby. None until the window is full.
    """
    from collections import deque

    from smartscope.inference.events import EventWindow, event_map, persistent_score
    from smartscope.simulation.camera import adu_to_photons

    model = shipped_model(name)
    camera = camera_of(config)
    window = EventWindow(int(model.card["frames"]), float(model.card.get("window_spacing_ms", 0.0)) / 1000)
    previous: deque[np.ndarray] = deque(maxlen=max(int(model.card.get("min_frames", 1)) - 1, 0))

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


def event_intervals(run: ClosedLoopRun) -> list[tuple[float, float]]:
    """(onset, end) of every fission event the frames showed, clipped to the run (simulation s)."""
    t0, t1 = run.t_s[0], run.t_s[-1] + run.states["interval_ms"][-1] / 1000
    spans = {}
    for truth in run.truths:
        for ev in getattr(truth, "events", []):
            spans[ev.id] = (max(ev.onset_s, t0), min(ev.end_s, t1))
    return sorted(spans.values())


# thresholds for the stand-in score (0.9 on events, 0.1 off, sd 0.1): well clear of both
FRAME_RATE_PARAMS = {"upper": 0.6, "lower": 0.4, "min_fast_frames": 10}


def frame_rate_scenario(seed: int = 0, *, duration_s: float = 600.0, size_px: int = 96,
                        fission_rate_per_um_per_s: float = 0.0015,
                        fast_interval_ms: float = 20.0, slow_interval_ms: float = 100.0,
                        exposure_ms: float = 20.0, detection_delay_s: float = 0.25, noise: float = 0.1,
                        dose_budget: float = 0.4, score: str = "truth",
                        params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Event-driven frame rate on the live sample, scored on the truth's fission events.

    The event score is truth-derived (`truth_event_score`, score="truth") or
    the shipped event model's (score="model", `event_model_scorer`, with the
    card's switch_threshold, set by a false-alarm budget, as the upper
    hysteresis threshold).
    Fission is made rarer than the live default (`fission_rate_per_um_per_s`)
    so that events fill about a tenth of the time, the situation event-driven
    acquisition is for. The slow interval sets the reaction time: a frame
    that shows an event was taken at the slow rate, so the switch costs the
    detection delay plus up to two slow periods of each event. Scores: the
    fraction of event time during which frames came at the fast
    interval, and the excitation dose relative to imaging the whole run fast;
    per event, the time from its onset to the first fast frame (switch_delay_s).
    The fixed settings are computed, not simulated: always fast (all event
    time fast, dose 1) and the fastest fixed interval within the dose budget
    (no event time at the fast rate).
    """
    if not live_mode_available():
        raise RuntimeError("the simulation has no live mode (smartscope.simulation.config.SimulationConfig.mode)")
    cfg = live_config(seed, size_px=size_px, exposure_ms=exposure_ms, slow_interval_ms=slow_interval_ms,
                      fission_rate_per_um_per_s=fission_rate_per_um_per_s)
    spec = {"name": "frame_rate", "module": "policies.frame_rate",
            "params": {"fast_interval_ms": fast_interval_ms, "slow_interval_ms": slow_interval_ms,
                       **FRAME_RATE_PARAMS, **(params or {})}}
    # frames needed: all slow, plus the fast frames that events will add (bounded by all fast)
    n_max = int(duration_s / (max(exposure_ms, fast_interval_ms) / 1000)) + 1
    if score == "model":
        scorer = event_model_scorer(cfg)
        card = shipped_model("events.onnx").card
        upper = float(card.get("switch_threshold", card.get("threshold", 0.5)))
        spec["params"].update({"upper": upper, "lower": upper / 2, **(params or {})})
        source = "the shipped event model (events.onnx)"
    else:
        scorer = truth_event_score(detection_delay_s, noise)
        source = "truth-derived stand-in (simulated fission events + noise), not the event model"
    run = _run_for(cfg, [spec], duration_s, n_max, event_score=scorer)
    t0 = run.t_s[0]
    periods_s = np.maximum(run.states["interval_ms"], exposure_ms) / 1000
    t_end = run.t_s[-1] + periods_s[-1]
    grid_ms = np.arange(int(round((t_end - t0) * 1000)))
    frame_of = np.searchsorted(run.t_s - t0, grid_ms / 1000, side="right") - 1
    fast = periods_s[frame_of] <= max(exposure_ms, fast_interval_ms) / 1000 + 1e-9
    in_event = np.zeros(grid_ms.size, bool)
    spans = event_intervals(run)
    for a, b in spans:
        in_event[int((a - t0) * 1000):int(np.ceil((b - t0) * 1000))] = True
    event_s = in_event.sum() / 1000
    # per event: time from its onset (or the run's start) to the first frame taken fast, None if never
    switch_delays_s: list[float | None] = []
    for a, b in spans:
        fast_ms = np.flatnonzero(fast[int((a - t0) * 1000):int(np.ceil((b - t0) * 1000))])
        switch_delays_s.append(float(fast_ms[0]) / 1000 if fast_ms.size else None)
    caught = [d for d in switch_delays_s if d is not None]
    dose = float(sum(t.excitation_mw * t.exposure_ms for t in run.truths))  # mW·ms = µJ
    fast_period_ms = max(exposure_ms, fast_interval_ms)
    dose_always_fast = (t_end - t0) * 1000 / fast_period_ms * exposure_ms * run.truths[0].excitation_mw
    fixed_within_budget_ms = fast_period_ms / dose_budget  # the fastest fixed interval within the budget
    return {
        "seed": seed, "duration_s": float(t_end - t0), "frames": len(run.truths),
        "events": len(spans), "event_time_s": float(event_s),
        "event_time_fraction": float(event_s / (t_end - t0)),
        "fast_fraction_of_event_time": float((fast & in_event).sum() / in_event.sum()) if in_event.any() else None,
        "fast_fraction_outside_events": float((fast & ~in_event).sum() / max(1, (~in_event).sum())),
        "switch_delay_s": switch_delays_s,
        "events_imaged_fast": len(caught),
        "median_switch_delay_s": float(np.median(caught)) if caught else None,
        "dose_vs_always_fast": float(dose / dose_always_fast),
        "fixed_within_budget_interval_ms": fixed_within_budget_ms,
        "fixed_within_budget_fast_fraction": 0.0 if fixed_within_budget_ms > fast_period_ms else 1.0,
        "score_source": source,
        "switches": int(run.engine.actions.get("frame_rate", 0)),
    }


def _run_for(config: SmartscopeConfig, policies: Sequence[dict[str, Any]], duration_s: float, n_max: int,
             **kw: Any) -> ClosedLoopRun:
    """run_closed_loop until `duration_s` of simulation time (at most n_max frames), no localizer."""
    return run_closed_loop(config, policies, n_max, localize=False,
                           until=lambda truth: truth.t_s >= duration_s, **kw)


# -- 3. focus: hold focus against axial drift --------------------------------------------------


def drifting_config(seed: int, drift_nm_per_min: float, *, size_px: int = 64, interval_ms: float = 100.0,
                    activation_mw: float = 60.0) -> SmartscopeConfig:
    """The demo's dSTORM sample imaged at 10 frames/s while the focus drifts steadily."""
    cfg = base_config(seed=seed, size_px=size_px, interval_ms=interval_ms, activation_mw=activation_mw)
    sample = cfg.simulation.sample
    sample.n_filaments, sample.labels_per_um, sample.z_range_nm = 6, 300.0, 400.0
    cfg.simulation.drift.focus_drift_nm_per_s = drift_nm_per_min / 60.0
    return cfg


def focus_scenario(seed: int = 0, *, drift_nm_per_min: float = 100.0, n_frames: int = 1500,
                   size_px: int = 64, interval_ms: float = 100.0,
                   params: dict[str, Any] | None = None) -> dict[str, Any]:
    """RMS defocus (truth: FrameTruth.focus_offset_nm) with the focus lock vs without correction.

    One run: the drift does not depend on the stage, so the defocus without
    correction is the run's defocus minus the stage's moves. "Best fixed" is
    the best constant stage position in hindsight (the offsets' standard
    deviation about their mean), generous to the fixed setting; "uncorrected"
    leaves the stage where focus was set at the start. The lock's first
    reference frames count in its RMS.
    """
    spec = {"name": "focus", "module": "policies.focus", "params": params or {}}
    run = run_closed_loop(drifting_config(seed, drift_nm_per_min, size_px=size_px, interval_ms=interval_ms),
                          [spec], n_frames)
    offset = run.focus_offset_nm
    stage_nm = np.array([t.stage_z_um for t in run.truths]) * 1000.0
    uncorrected = offset - (stage_nm - stage_nm[0])
    return {
        "seed": seed, "frames": n_frames, "duration_s": float(run.t_s[-1] - run.t_s[0]),
        "drift_nm_per_min": drift_nm_per_min,
        "rms_defocus_nm": float(np.sqrt(np.mean(offset**2))),
        "max_abs_defocus_nm": float(np.max(np.abs(offset))),
        "rms_uncorrected_nm": float(np.sqrt(np.mean(uncorrected**2))),
        "final_uncorrected_nm": float(uncorrected[-1]),
        "rms_best_fixed_nm": float(np.std(uncorrected)),
        "moves": int(run.engine.actions.get("focus", 0)),
    }


# -- 4. view angle: a sample mounted tilted; the best angle found by an exhaustive sweep ---------

VIEW_ANGLE_SWEEP_DEG = tuple(float(a) for a in range(-60, 61, 10))


def mount_tilt_deg(seed: int) -> float:
    """The (unknown to the policy) tilt the sample of this seed was mounted with: 15-35°, either sign."""
    rng = np.random.default_rng([seed, 4])
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 35.0))


def tilted_sample_config(seed: int, *, size_px: int = 64, activation_mw: float = 60.0) -> SmartscopeConfig:
    """Four filaments in a 600 nm thick layer; no focus drift (the angle alone decides)."""
    cfg = base_config(seed=seed, size_px=size_px, activation_mw=activation_mw)
    sample = cfg.simulation.sample
    sample.n_filaments, sample.labels_per_um, sample.z_range_nm = 4, 300.0, 600.0
    cfg.simulation.drift.focus_drift_nm_per_s = 0.0
    cfg.simulation.drift.focus_noise_nm = 0.0
    return cfg


def mount_tilted(tilt_deg: float) -> Callable[[SimulatedMicroscope], None]:
    """Set-up hook: tilt the sample's molecules about the stage's rotation axis by `tilt_deg`."""

    def setup(scope: SimulatedMicroscope) -> None:
        centre = (0.5 * scope.field_nm[0], 0.5 * scope.field_nm[1])
        scope.positions_nm = rotate_positions(scope.positions_nm, tilt_deg, scope.config.rotation_axis, centre)

    return setup


def resolved_truth(locs: np.ndarray, truth: FrameTruth, tolerance_nm: float = 100.0) -> int:
    """Localizations that found a true emitter within `tolerance_nm` laterally (greedy, nearest first)."""
    if len(locs) == 0 or truth.id.size == 0:
        return 0
    d = np.hypot(locs[:, None, 0] - truth.x_nm[None, :], locs[:, None, 1] - truth.y_nm[None, :])
    pairs = np.argwhere(d <= tolerance_nm)
    order = np.argsort(d[pairs[:, 0], pairs[:, 1]])
    used_l, used_t, n = set(), set(), 0
    for i, j in pairs[order]:
        if i not in used_l and j not in used_t:
            used_l.add(i)
            used_t.add(j)
            n += 1
    return n


def information_at(seed: int, angle_deg: float, *, n_frames: int = 40, size_px: int = 64) -> float:
    """Truth: true emitters localized within 100 nm per frame at a fixed angle, fresh sample."""
    run = run_closed_loop(tilted_sample_config(seed, size_px=size_px), [], n_frames,
                          initial={"angle_deg": angle_deg}, setup=mount_tilted(mount_tilt_deg(seed)))
    return float(np.mean([resolved_truth(loc, t) for loc, t in zip(run.localizations, run.truths, strict=True)]))


def view_angle_scenario(seed: int = 0, *, n_frames: int = 600, size_px: int = 64,
                        sweep_deg: Sequence[float] = VIEW_ANGLE_SWEEP_DEG, sweep_frames: int = 40,
                        params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The policy's chosen angle vs the best of an exhaustive sweep, by truth information.

    The sample is mounted with a tilt the policy does not know
    (`mount_tilt_deg(seed)`), so at the stage's 0° part of it is out of focus.
    Information at an angle = true emitters localized within 100 nm per frame,
    measured on a fresh sample held at that angle (so bleaching during the
    policy's exploration does not enter the score). The policy starts at 0°;
    the fixed setting is 0° (no rotation).
    """
    sweep = {float(a): information_at(seed, a, n_frames=sweep_frames, size_px=size_px) for a in sweep_deg}
    spec = {"name": "view_angle", "module": "policies.view_angle", "params": params or {}}
    run = run_closed_loop(tilted_sample_config(seed, size_px=size_px), [spec], n_frames,
                          initial={"angle_deg": 0.0}, setup=mount_tilted(mount_tilt_deg(seed)))
    chosen = float(run.states["angle_deg"][-1])
    policy = run.engine.slots["view_angle"].policy
    if chosen not in sweep:
        sweep[chosen] = information_at(seed, chosen, n_frames=sweep_frames, size_px=size_px)
    best = max(sweep, key=sweep.__getitem__)
    moves = sum(1 for _, name, _ in run.writes if name == "angle_deg")
    return {
        "seed": seed, "frames": n_frames, "mount_tilt_deg": round(mount_tilt_deg(seed), 1),
        "chosen_deg": chosen, "best_deg": best,
        "information_chosen": sweep[chosen], "information_best": sweep[best],
        "information_fixed_0": sweep.get(0.0),
        "ratio_chosen": sweep[chosen] / sweep[best] if sweep[best] > 0 else float("nan"),
        "ratio_fixed_0": sweep[0.0] / sweep[best] if 0.0 in sweep and sweep[best] > 0 else None,
        "rotations": moves, "exploration_frames": _last_change(run.states["angle_deg"]),
        "policy_scores": {f"{a:g}": round(s, 2) for a, s in sorted(policy.scores.items())},
        "sweep": {f"{a:g}": round(v, 2) for a, v in sorted(sweep.items())},
    }


def _last_change(values: np.ndarray) -> int:
    changes = np.flatnonzero(np.diff(values) != 0)
    return int(changes[-1] + 1) if changes.size else 0
