"""Scenario 1, illumination: hold the emitters per frame at a set point while the dye bleaches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from smartscope.config import SmartscopeConfig
from smartscope.scenarios.closed_loop import ClosedLoopRun, base_config, counting_model_counter, run_closed_loop
from smartscope.scenarios.metrics import density_error, settling_frame

ILLUMINATION_FIXED_MW = (10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0)
ILLUMINATION_FIXED_MW_COUNTING = (30.0, 45.0, 60.0, 90.0)  # around the best; the counting model costs ~10 ms/frame


def bleaching_config(seed: int, *, size_px: int = 64, activation_mw: float = 5.0,
                     bleach_factor: float = 4.0) -> SmartscopeConfig:
    """A densely labelled sample whose dye bleaches `bleach_factor` × faster than the default."""
    cfg = base_config(seed=seed, size_px=size_px, activation_mw=activation_mw)
    sample = cfg.simulation.sample
    sample.n_filaments, sample.labels_per_um, sample.z_range_nm = 6, 300.0, 400.0
    cfg.simulation.photophysics.bleach_per_photon *= bleach_factor
    return cfg


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
