"""`smartscope bench simulation`: how fast the simulated microscope renders frames.

Each case builds a `SimulatedMicroscope` and times `snap()` (sample physics,
optics and camera noise: everything the simulated camera device does per
frame) over repeats, after a warm-up frame. Reported: frames/s as the median
over repeats of wall-clock time, and of process CPU time (steadier on a
shared machine), with the issue's targets: SMLM 256 x 256 with ~50 emitters on
per frame >= 200 frames/s, live 128 x 128 >= 100 frames/s.

The SMLM cases use 8 filaments per 25.6 um of field (the same labelling
density at both sizes) and the activation power that puts ~50 emitters on in
a 256 x 256 frame (so ~3200 in a 2048 x 2048 frame); the live cases use the
default network at excitation 50 mW. Exposure 20 ms throughout.
"""

from __future__ import annotations

import time
from statistics import median
from typing import Any

import numpy as np

from smartscope.simulation import SimulatedMicroscope, SimulationConfig

_EXPOSURE_MS = 20.0
_EXCITATION_MW = 50.0
_TARGET_ON = 50  # emitters on per 256 x 256 frame


def _config(mode: str, size_px: int) -> SimulationConfig:
    spec: dict[str, Any] = {"mode": mode, "camera": {"width_px": size_px, "height_px": size_px}}
    if mode == "smlm":
        spec["sample"] = {"n_filaments": max(1, round(8 * size_px / 256))}
    return SimulationConfig.model_validate(spec)


def _activation_for(scope: SimulatedMicroscope, lit_per_frame: float, excitation_mw: float) -> float:
    """Activation power (mW) whose steady state lights lit_per_frame emitters per frame.

    Lit in a frame: the molecules on at its start plus those switching on during
    it (as many as leave the on state, by switching off or bleaching).
    """
    pp = scope.config.photophysics
    k_leave = pp.k_off_per_s + pp.photons_per_mw_per_s * excitation_mw * pp.bleach_per_photon
    on = lit_per_frame / (1.0 + k_leave * _EXPOSURE_MS / 1000.0)
    k_on = on * k_leave / max(scope.n_molecules - on, 1.0)
    return max(0.0, (k_on - pp.k_on_base_per_s) / pp.k_on_per_mw_per_s)


def time_case(mode: str, size_px: int, frames: int, repeats: int, activation_mw: float | None = None) -> dict[str, Any]:
    """Frames/s of `snap` for one mode and sensor size (median over repeats)."""
    t0 = time.perf_counter()
    scope = SimulatedMicroscope(_config(mode, size_px), seed=1, keep_truth=False)
    setup_s = time.perf_counter() - t0
    if mode == "smlm" and activation_mw is None:
        activation_mw = _activation_for(scope, _TARGET_ON * (size_px / 256) ** 2, _EXCITATION_MW)
    scope.activation_mw = activation_mw or 0.0
    scope.excitation_mw = _EXCITATION_MW
    scope.snap(_EXPOSURE_MS)  # warm-up: steady state, cached tables
    wall, cpu, on = [], [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(frames):
            _, truth = scope.snap(_EXPOSURE_MS)
            on.append(truth.id.size)
        wall.append(frames / (time.perf_counter() - w0))
        cpu.append(frames / max(time.process_time() - c0, 1e-9))
    return {
        "mode": mode,
        "shape": [size_px, size_px],
        "fps": round(median(wall), 1),
        "fps_cpu": round(median(cpu), 1),
        "fps_repeats": [round(v, 1) for v in wall],
        "frames_per_repeat": frames,
        "repeats": repeats,
        "setup_s": round(setup_s, 3),
        "emitters_on_per_frame": round(float(np.mean(on)), 1) if mode == "smlm" else None,
        "molecules": scope.n_molecules if mode == "smlm" else None,
        "tubule_length_um": round(scope.network.length_um, 1) if scope.network is not None else None,
        "activation_mw": round(float(scope.activation_mw), 2),
        "excitation_mw": _EXCITATION_MW,
        "exposure_ms": _EXPOSURE_MS,
    }


CASES = (
    # name, mode, size, (frames, repeats), (quick frames, quick repeats), target frames/s
    ("smlm_256", "smlm", 256, (200, 5), (40, 3), 200.0),
    ("smlm_2048", "smlm", 2048, (5, 3), (2, 2), None),
    ("live_128", "live", 128, (200, 5), (40, 3), 100.0),
    ("live_512", "live", 512, (20, 3), (5, 2), None),
)


def run(quick: bool = False) -> dict[str, Any]:
    results: dict[str, Any] = {}
    header = f"{'case':<10} {'shape':>10} {'frames/s':>9} {'cpu f/s':>8} {'on/frame':>9} {'target':>7}  repeats (frames/s)"
    print(header)
    print("-" * len(header))
    for name, mode, size, full, fast, target in CASES:
        frames, repeats = fast if quick else full
        case = time_case(mode, size, frames, repeats)
        case["target_fps"] = target
        case["meets_target"] = None if target is None else case["fps"] >= target
        results[name] = case
        on = "-" if case["emitters_on_per_frame"] is None else f"{case['emitters_on_per_frame']:.0f}"
        print(
            f"{name:<10} {f'{size}x{size}':>10} {case['fps']:>9.1f} {case['fps_cpu']:>8.1f} {on:>9} "
            f"{'-' if target is None else f'>={target:.0f}':>7}  {case['fps_repeats']}",
            flush=True,
        )
    return results
