"""Scenario 2, frame rate: fast during fission events, slow otherwise, on the live sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from smartscope.config import SmartscopeConfig
from smartscope.control.policy import load_policy_class
from smartscope.inference.session import read_card
from smartscope.scenarios.closed_loop import (
    ClosedLoopRun,
    EventScore,
    base_config,
    event_model_scorer,
    live_mode_available,
    run_closed_loop,
)
from smartscope.scenarios.metrics import event_intervals
from smartscope.simulation.microscope import FrameTruth


def live_config(seed: int, *, size_px: int = 96, exposure_ms: float = 20.0, slow_interval_ms: float = 100.0,
                fission_rate_per_um_per_s: float | None = None) -> SmartscopeConfig:
    """Live mode (mitochondria-like network, fission events), starting at the slow rate."""
    cfg = base_config(seed=seed, size_px=size_px, exposure_ms=exposure_ms, interval_ms=slow_interval_ms,
                      activation_mw=0.0)
    cfg.simulation.mode = "live"
    if fission_rate_per_um_per_s is not None:
        cfg.simulation.live.fission_rate_per_um_per_s = fission_rate_per_um_per_s
    return cfg


def truth_event_score(detection_delay_s: float = 0.25, noise: float = 0.1) -> EventScore:
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


# thresholds for the stand-in score (0.9 on events, 0.1 off, sd 0.1): well clear of both
FRAME_RATE_PARAMS = {"upper": 0.6, "lower": 0.4, "min_fast_frames": 10}


def frame_rate_scenario(seed: int = 0, *, duration_s: float = 600.0, size_px: int = 96,
                        fission_rate_per_um_per_s: float = 0.0015,
                        fast_interval_ms: float = 20.0, slow_interval_ms: float = 100.0,
                        exposure_ms: float = 20.0, detection_delay_s: float = 0.25, noise: float = 0.1,
                        dose_budget: float = 0.4, score: str = "truth",
                        params: dict[str, Any] | None = None, model: str = "events.onnx") -> dict[str, Any]:
    """Event-driven frame rate on the live sample, scored on the truth's fission events.

    The event score is truth-derived (`truth_event_score`, score="truth") or
    event model's (score="model": the shipped one, or `model`, a path to a
    candidate with its card beside it; `event_model_scorer`, with the
    card's switch_threshold, set by a false-alarm budget, as the upper
    hysteresis threshold and half of it as the lower, as the daemon sets
    them: `FrameRate.card_defaults`).
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
        scorer = event_model_scorer(cfg, model)
        cards = {"event_model": read_card(model, "cpu")[1]}  # the scorer has the session
        # as the daemon sets them (build_policies)
        spec["params"].update(load_policy_class(spec["module"]).card_defaults(cards, params or {}))
        source = f"the event model {model}"
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
