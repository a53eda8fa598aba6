"""Emitter counting at high density: the counting model vs counting localizations.

Same causal 3-frame stacks for both; the baseline counts the localization
network's detections in the last frame (what a localizer-driven density
controller would see). Scored by tolerance matching (F1) and the per-frame
relative count error, with inference time per frame. "F1 snr≥2" scores as the
published HD-SMLM counter was scored: emitters with peak SNR below 2 left out.
"counted/true" is all emitters counted over all there are: the bias a density
controller regulating the count would carry (the sparse 0.2 /µm² row is where
a SMLM acquisition usually runs).
"""

from __future__ import annotations

import time

import numpy as np

from smartscope.inference.counting import PUBLISHED_MIN_SNR, count_frame, score_counts
from smartscope.inference.localization import localize_photons
from smartscope.inference.session import load_model
from smartscope.simulation import CameraConfig, OpticsConfig
from smartscope.training.stacks import simulate_stacks
from smartscope.transport.protocol import CameraParams

TOLERANCE_NM = 200.0


def run(quick: bool = False) -> dict:
    optics, camera = OpticsConfig(), CameraConfig()
    counter = load_model("counting.onnx", "cpu")
    localizer = load_model("localization.onnx", "cpu")
    params = CameraParams(pixel_size_nm=camera.pixel_size_nm, offset_adu=camera.offset_adu,
                          e_per_adu=camera.e_per_adu, qe=camera.qe)
    n = 10 if quick else 40
    results = {}
    print(f"{'density /µm²':>12} {'method':<22} {'F1':>6} {'recall':>7} {'prec':>6} {'count err':>9} "
          f"{'counted/true':>12} {'F1 snr≥2':>8} {'ms/frame':>9}")
    for density in (0.2, 1.0, 3.0, 6.0, 8.0):
        rng = np.random.default_rng(int(density * 100))
        stacks, _, truth = simulate_stacks(rng, n, 3, 64, optics, camera, on_density_per_um2=density)
        t0 = time.perf_counter()
        model_pred = [count_frame(counter, s) * camera.pixel_size_nm for s in stacks]
        model_ms = (time.perf_counter() - t0) / n * 1000
        t0 = time.perf_counter()
        loc_pred = [localize_photons(localizer, s, params, threshold=0.5)[0][:, :2] for s in stacks]
        loc_ms = (time.perf_counter() - t0) / n * 1000
        results[str(density)] = {}
        for name, pred, ms in (("counting model", model_pred, model_ms), ("localizations", loc_pred, loc_ms)):
            s = score_counts(truth, pred, TOLERANCE_NM)
            s["snr_ge_2"] = score_counts(truth, pred, TOLERANCE_NM, min_snr=PUBLISHED_MIN_SNR)
            s["ms_per_frame"] = round(ms, 2)
            results[str(density)][name] = s
            print(f"{density:>12} {name:<22} {s['f1']:>6.3f} {s['recall']:>7.3f} {s['precision']:>6.3f} "
                  f"{s['median_count_error']:>9.3f} {s['count_ratio']:>12.3f} {s['snr_ge_2']['f1']:>8.3f} {ms:>9.2f}")
    return results
