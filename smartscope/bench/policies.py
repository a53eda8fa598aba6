"""Closed-loop policies vs the best fixed setting, on the simulated microscope: `smartscope bench policies`.

Runs the four scenarios of `smartscope.scenarios` (real core and MDA runner,
localizer, engine, safety envelope; simulation time, so deterministic) over several
seeds and prints one table: policy, metric, value with the policy, value with
the best fixed setting, goal, pass/fail. Values are medians over seeds; the
JSON has every seed. A metric passes when its median meets the goal.

Density error (illumination): localizations per frame averaged over 50
frames (1 s), relative to the set point, from the policy's settling frame on;
the "true emitters" rows score the emitters truly on the same way, to show
what a biased count (localizations miss crowded and faint emitters) costs.

What "best fixed" means per policy:
- illumination: the fixed activation power (of a sweep) with the least median error;
- frame rate: always fast for the dose (1.0), the fastest fixed interval within
  the dose budget for the event time imaged fast (0: it is never the fast rate);
- focus: the best constant stage position in hindsight (generous); the
  uncorrected RMS (stage left where focus was set) is in the JSON too;
- view angle: 0° (no rotation); the best angle is by definition the sweep's best.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

from smartscope import scenarios

GOALS = {
    "illumination": ("median |density error| / set point", "<=", 0.10),
    "illumination_counting": ("same, counting model as input", "<=", 0.10),
    "illumination_truth": ("same, true emitters (localizations)", None, None),
    "illumination_counting_truth": ("same, true emitters (counting model)", None, None),
    "illumination_p90": ("p90 |density error| / set point", None, None),
    "illumination_settling": ("settling time (frames, ±10 %)", None, None),
    "frame_rate_fast": ("event time imaged fast, truth score", ">=", 0.90),
    "frame_rate_dose": ("light dose vs always fast, truth score", "<=", 0.40),
    "frame_rate_model_fast": ("event time fast, event-model score", ">=", 0.90),
    "frame_rate_model_dose": ("dose vs always fast, event-model score", "<=", 0.40),
    "frame_rate_model_delay": ("onset to first fast frame (s), model", None, None),
    "focus_100": ("RMS defocus, drift 100 nm/min (nm)", "<=", 50.0),
    "focus_500": ("RMS defocus, drift 500 nm/min (nm)", "<=", 50.0),
    "view_angle": ("information at chosen / best angle", ">=", 0.90),
}


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(statistics.median(vals)) if vals else None


def _passes(value: float | None, op: str | None, goal: float | None) -> bool | None:
    if op is None or value is None:
        return None
    return value <= goal if op == "<=" else value >= goal


def _timed(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.time()
    result = fn()
    print(f"  {label}: {time.time() - t0:.0f} s", flush=True)
    return result


def run(quick: bool = False) -> dict[str, Any]:
    seeds = [0] if quick else [0, 1, 2]
    # one core per run: no set-up chatter; nor the runner's warning when a run stops on its duration (cancelled)
    logging.getLogger("pymmcore-plus").setLevel(logging.ERROR)
    per_seed: dict[str, list[dict[str, Any]]] = {}
    print(f"policies on the simulated microscope, seeds {seeds}{' (quick: short runs)' if quick else ''}")
    ill_frames = 600 if quick else 1500
    per_seed["illumination"] = [
        _timed(f"illumination seed {s}", lambda s=s: scenarios.illumination_scenario(s, n_frames=ill_frames))
        for s in seeds]
    if scenarios.counting_model_available():
        per_seed["illumination_counting"] = [
            _timed(f"illumination (counting model) seed {s}",
                   lambda s=s: scenarios.illumination_scenario(
                       s, n_frames=ill_frames, signal="counting_model",
                       fixed_mw=(60.0,) if quick else scenarios.ILLUMINATION_FIXED_MW_COUNTING))
            for s in seeds]
    if scenarios.live_mode_available():
        duration = 150.0 if quick else 600.0
        per_seed["frame_rate"] = [
            _timed(f"frame rate seed {s}", lambda s=s: scenarios.frame_rate_scenario(s, duration_s=duration))
            for s in seeds]
        if scenarios.event_model_available():
            model_duration = 60.0 if quick else 200.0  # the model costs ~10 ms a frame
            per_seed["frame_rate_event_model"] = [
                _timed(f"frame rate (event model) seed {s}",
                       lambda s=s: scenarios.frame_rate_scenario(s, duration_s=model_duration, score="model"))
                for s in seeds]
        if not quick:  # the trade-off: a slower slow rate saves dose and reacts later
            per_seed["frame_rate_slow_200ms"] = [
                _timed(f"frame rate (slow 200 ms) seed {s}",
                       lambda s=s: scenarios.frame_rate_scenario(s, duration_s=duration, slow_interval_ms=200.0))
                for s in seeds]
    focus_frames = 600 if quick else 1500
    for rate in (100, 500):
        per_seed[f"focus_{rate}"] = [
            _timed(f"focus {rate} nm/min seed {s}",
                   lambda s=s, rate=rate: scenarios.focus_scenario(s, drift_nm_per_min=rate, n_frames=focus_frames))
            for s in seeds]
    per_seed["view_angle"] = [
        _timed(f"view angle seed {s}", lambda s=s: scenarios.view_angle_scenario(s)) for s in seeds]

    def med(key: str, field: str) -> float | None:
        return _median([r.get(field) for r in per_seed.get(key, [])])

    rows: list[dict[str, Any]] = []

    def row(policy: str, goal_key: str, value: float | None, fixed: float | None, fixed_label: str) -> None:
        metric, op, goal = GOALS[goal_key]
        rows.append({"policy": policy, "metric": metric, "policy_value": value, "fixed_value": fixed,
                     "fixed_setting": fixed_label, "goal": None if op is None else f"{op} {goal:g}",
                     "pass": _passes(value, op, goal)})

    ill = per_seed["illumination"]
    row("illumination", "illumination", med("illumination", "median_abs_error"),
        med("illumination", "best_fixed_median_abs_error"),
        "best fixed power " + "/".join(f"{r['best_fixed_mw']:g}" for r in ill) + " mW")
    row("illumination", "illumination_truth", med("illumination", "true_median_abs_error"), None,
        "counted / true " + "/".join(f"{r['counted_over_true']:.2f}" for r in ill))
    row("illumination", "illumination_p90", med("illumination", "p90_abs_error"),
        med("illumination", "best_fixed_p90_abs_error"), "the same fixed power")
    row("illumination", "illumination_settling", med("illumination", "settling_frames"), None, "from 5 mW")
    if "illumination_counting" in per_seed:
        ilc = per_seed["illumination_counting"]
        row("illumination", "illumination_counting", med("illumination_counting", "median_abs_error"),
            med("illumination_counting", "best_fixed_median_abs_error"),
            "best fixed power " + "/".join(f"{r['best_fixed_mw']:g}" for r in ilc) + " mW")
        row("illumination", "illumination_counting_truth", med("illumination_counting", "true_median_abs_error"),
            None, "counted / true " + "/".join(f"{r['counted_over_true']:.2f}" for r in ilc))
    if "frame_rate" in per_seed:
        fr = per_seed["frame_rate"]
        row("frame_rate", "frame_rate_fast", med("frame_rate", "fast_fraction_of_event_time"),
            med("frame_rate", "fixed_within_budget_fast_fraction"),
            f"fixed {fr[0]['fixed_within_budget_interval_ms']:g} ms (within dose budget)")
        row("frame_rate", "frame_rate_dose", med("frame_rate", "dose_vs_always_fast"), 1.0, "always fast")
    if "frame_rate_event_model" in per_seed:
        row("frame_rate", "frame_rate_model_fast", med("frame_rate_event_model", "fast_fraction_of_event_time"),
            0.0, "fixed 50 ms (within dose budget)")
        row("frame_rate", "frame_rate_model_dose", med("frame_rate_event_model", "dose_vs_always_fast"), 1.0,
            "always fast")
        row("frame_rate", "frame_rate_model_delay", med("frame_rate_event_model", "median_switch_delay_s"), None,
            "events last 5 s (4 s constriction)")
    for rate in (100, 500):
        row("focus", f"focus_{rate}", med(f"focus_{rate}", "rms_defocus_nm"),
            med(f"focus_{rate}", "rms_best_fixed_nm"), "best constant Z in hindsight")
    row("view_angle", "view_angle", med("view_angle", "ratio_chosen"), med("view_angle", "ratio_fixed_0"), "0°")

    print()
    print(f"{'policy':<13}{'metric':<40}{'policy':>9}{'fixed':>9}  {'fixed setting':<36}{'goal':<9}result")
    for r in rows:
        def fmt(v: float | None) -> str:
            return "-" if v is None else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}")
        verdict = {True: "PASS", False: "FAIL", None: ""}[r["pass"]]
        print(f"{r['policy']:<13}{r['metric']:<40}{fmt(r['policy_value']):>9}{fmt(r['fixed_value']):>9}  "
              f"{r['fixed_setting']:<36}{r['goal'] or '':<9}{verdict}")
    print("medians over seeds; details per seed in the JSON.")
    if "frame_rate_slow_200ms" in per_seed:
        print(f"frame rate with a 200 ms slow interval instead of 100 ms: event time imaged fast "
              f"{med('frame_rate_slow_200ms', 'fast_fraction_of_event_time'):.3f}, dose "
              f"{med('frame_rate_slow_200ms', 'dose_vs_always_fast'):.3f} of always fast.")
    if "frame_rate_event_model" in per_seed:
        print("frame rate with the event model: its score (the event map's maximum, as the worker computes "
              "it) is the policy's input; see the JSON for the event time fraction and fast time outside events.")
    if "frame_rate" in per_seed:
        print("frame rate: the first two frame_rate rows use a truth-derived event score (simulated fission "
              "events, a detection delay of 0.25 s and noise), NOT the event model.")
    else:
        print("frame rate: not run (the simulation has no live mode with fission events yet).")
    return {"seeds": seeds, "table": rows, "per_seed": per_seed}
