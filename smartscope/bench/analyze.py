"""`smartscope analyze` measured: drift correction, merging, and the pipeline's speed and memory.

1. **Drift** on a simulated stack with a known lateral drift (about 200 nm
   over 10 000 frames of 64², filaments; analysis/synthetic.py): RMS error of
   the estimated drift curve (after removing a constant offset) for our RCC,
   the plain cross-correlation baseline (each segment against the first) and,
   when an interpreter with picassosr is named in SMARTSCOPE_PICASSO_PYTHON,
   Picasso's own RCC on the same localizations (read from our HDF5 file); FRC
   resolution of the localizations uncorrected, corrected by each, and
   corrected by the true drift.
2. **Merging** of the RCC-corrected localizations, each matched to its true
   molecule: purity (merged groups of ≥ 2 localizations that are one
   molecule) and split fraction (true blinks cut into more than one group),
   at three merge distances.
3. **Throughput**: `smartscope analyze` on a 20 000-frame 128² stack, as a
   subprocess, in one process and on a 2-worker LocalCluster: frames/s over
   the whole command (start-up included) and the peak RSS of its process
   tree (sampled every 0.1 s), and whether both wrote the same table.

`--quick`: 2 000 frames in each part (a smoke test of the bench itself).
"""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from smartscope.analysis.drift import (
    DriftSettings,
    apply_drift,
    drift_cross_correlation,
    drift_rms_error_nm,
    estimate_drift,
)
from smartscope.analysis.frc import frc
from smartscope.analysis.localize import LocalizeSettings, chunk_starts, localize_chunk
from smartscope.analysis.merge import MergeSettings, link, merge_scores
from smartscope.analysis.picasso import write_picasso
from smartscope.analysis.sources import discover
from smartscope.analysis.synthetic import match_to_truth, simulate_drifting_stack
from smartscope.analysis.table import concat

PICASSO_SCRIPT = """
import sys, numpy as np, picasso.io as io, picasso.postprocess as pp
locs, info = io.load_locs(sys.argv[1])
drift = pp.undrift(locs, info, int(sys.argv[2]), display=False)[0]
np.save(sys.argv[3], np.column_stack([drift["x"], drift["y"]]))
"""


def run(quick: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-analyze-") as tmp:
        tmp = Path(tmp)
        results = _drift_and_merge(tmp, n_frames=2000 if quick else 10_000, segment_frames=200 if quick else 1000)
        results["throughput"] = _throughput(tmp, n_frames=2000 if quick else 20_000, size_px=128)
    return results


def _drift_and_merge(tmp: Path, n_frames: int, segment_frames: int) -> dict:
    pixel_nm = 100.0
    stack_path = tmp / "drift.ome.tif"
    truth, true_drift = simulate_drifting_stack(stack_path, n_frames, drift_total_nm=200.0, size_px=64, seed=7)
    stack = discover([stack_path])[0]
    settings = LocalizeSettings()
    t0 = time.perf_counter()
    table = concat([localize_chunk(stack, a, min(a + 1000, n_frames), settings, pixel_nm)
                    for a in chunk_starts(n_frames, 1000)])
    print(f"drift: {n_frames} frames of 64², {len(table['frame'])} localizations "
          f"({time.perf_counter() - t0:.0f} s), true drift up to {np.hypot(*true_drift.T).max():.0f} nm")
    ds = DriftSettings(segment_frames=segment_frames)
    estimates = {"rcc": estimate_drift(table, n_frames, ds), "cross-correlation": drift_cross_correlation(
        table, n_frames, ds)}
    picasso = _picasso_rcc(tmp, table, n_frames, segment_frames, pixel_nm)
    if picasso is not None:
        estimates["picasso rcc"] = picasso
    drift = {"frames": n_frames, "segment_frames": segment_frames, "localizations": len(table["frame"]),
             "true_drift_max_nm": round(float(np.hypot(*true_drift.T).max()), 1),
             "frc_uncorrected_nm": _r(frc(table)), "frc_true_drift_nm": _r(frc(apply_drift(table, true_drift))),
             "methods": {}}
    print(f"  {'method':<20} {'RMS error nm':>12} {'FRC nm':>8}")
    print(f"  {'uncorrected':<20} {drift_rms_error_nm(np.zeros_like(true_drift), true_drift):>12.1f} "
          f"{drift['frc_uncorrected_nm']:>8}")
    for name, est in estimates.items():
        m = {"rms_error_nm": round(drift_rms_error_nm(est, true_drift), 2), "frc_nm": _r(frc(apply_drift(table, est)))}
        drift["methods"][name] = m
        print(f"  {name:<20} {m['rms_error_nm']:>12.1f} {m['frc_nm']:>8}")
    print(f"  {'true drift':<20} {0.0:>12.1f} {drift['frc_true_drift_nm']:>8}")
    if picasso is None:
        drift["picasso"] = "not run: set SMARTSCOPE_PICASSO_PYTHON to a python with picassosr installed"

    corrected = apply_drift(table, estimates["rcc"])
    molecule = match_to_truth(table, truth)
    merging = {"matched_fraction": round(float(np.mean(molecule >= 0)), 3), "by_distance": {}}
    print(f"merging ({merging['matched_fraction']:.0%} of localizations matched to a true molecule):")
    print(f"  {'distance nm':>11} {'gap':>3} {'groups':>7} {'purity':>7} {'split':>6}")
    for distance in (25.0, 50.0, 100.0):
        ms = MergeSettings(max_distance_nm=distance)
        s = merge_scores(link(corrected, ms), molecule, table["frame"], ms.max_gap_frames)
        merging["by_distance"][str(distance)] = s
        print(f"  {distance:>11.0f} {ms.max_gap_frames:>3} {s['groups']:>7} {s['purity']:>7.3f} "
              f"{s['split_fraction']:>6.3f}")
    return {"drift": drift, "merging": merging}


def _picasso_rcc(tmp: Path, table: dict, n_frames: int, segment_frames: int, pixel_nm: float) -> np.ndarray | None:
    """Picasso's RCC on our localizations, in the interpreter SMARTSCOPE_PICASSO_PYTHON names (None if unset):
    picasso pulls a Qt GUI stack that smartscope never depends on. Drift back in nm, like ours."""
    python = os.environ.get("SMARTSCOPE_PICASSO_PYTHON")
    if not python:
        return None
    n = len(table["frame"])
    h5 = tmp / "raw_locs.hdf5"
    write_picasso(h5, table, pixel_size_nm=pixel_nm, width_px=64, height_px=64, n_frames=n_frames,
                  sx_px=np.ones(n), sy_px=np.ones(n), source="bench", steps={})
    out = tmp / "picasso_drift.npy"
    subprocess.run([python, "-c", PICASSO_SCRIPT, str(h5), str(segment_frames), str(out)], check=True,
                   capture_output=True, cwd=tmp)
    return np.load(out) * pixel_nm


def _throughput(tmp: Path, n_frames: int, size_px: int) -> dict:
    stack_path = tmp / "throughput.ome.tif"
    simulate_drifting_stack(stack_path, n_frames, size_px=size_px, seed=11)
    print(f"throughput: `smartscope analyze` on {n_frames} frames of {size_px}² "
          f"({stack_path.stat().st_size / 1e9:.2f} GB)")
    print(f"  {'run on':<22} {'frames/s':>9} {'peak RSS MB':>12} {'seconds':>8}")
    runs = {}
    for name, workers in (("one process", 1), ("LocalCluster 2 workers", 2)):
        out = tmp / f"out-{workers}"
        cmd = [sys.executable, "-m", "smartscope", "analyze", str(stack_path), "--out", str(out),
               "--workers", str(workers)]
        seconds, peak_mb = _run_measured(cmd, tmp / f"out-{workers}.log")
        summary = json.loads((out / "summary.json").read_text())
        runs[name] = {"workers": workers, "frames_per_s": round(n_frames / seconds, 1), "seconds": round(seconds, 1),
                      "peak_rss_mb": round(peak_mb, 1), "localize_seconds": summary["localize_seconds"],
                      "localizations": summary["localizations"]}
        print(f"  {name:<22} {runs[name]['frames_per_s']:>9.1f} {peak_mb:>12.0f} {seconds:>8.1f}")
    one, two = runs["one process"], runs["LocalCluster 2 workers"]
    identical = filecmp.cmp(tmp / "out-1" / "localizations.csv", tmp / "out-2" / "localizations.csv", shallow=False)
    result = {"frames": n_frames, "shape_px": [size_px, size_px], "cpu_count": os.cpu_count(), "runs": runs,
              "speedup_2_workers": round(two["frames_per_s"] / one["frames_per_s"], 2),
              "rss_ratio_2_workers": round(two["peak_rss_mb"] / one["peak_rss_mb"], 2),
              "identical_localizations": identical}
    print(f"  2 workers / 1 process: {result['speedup_2_workers']}x frames/s, {result['rss_ratio_2_workers']}x "
          f"peak RSS; identical tables: {identical}")
    return result


def _run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run `cmd` (its output to `log`); its wall time (s) and the peak of the summed RSS of it and all its
    descendants (MB)."""
    import psutil

    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        peak = max(peak, total)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {log.read_text()[-2000:]}")
    return seconds, peak / 1e6


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)
