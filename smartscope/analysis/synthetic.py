"""Simulated SMLM stacks with a known lateral drift and known molecules, to measure the analysis against.

The simulated microscope (smartscope/simulation) blinks dye molecules along
filaments and keeps every emitter's identity; here the whole sample is moved
by a smooth lateral drift before each frame (the stage creeping), so the
drift each frame saw is known exactly, and so is which molecule made each
spot. The stack is written as the camera would (uint16 OME-TIFF with its
pixel size), through a generator: never held whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile

from smartscope.simulation import SimulationConfig
from smartscope.simulation.microscope import SimulatedMicroscope, truth_table


def drift_curve_nm(n_frames: int, total_nm: float) -> np.ndarray:
    """(n_frames, 2) [x_nm, y_nm]: a creep that is not a straight line (linear + wobble in x, quadratic
    in y), its largest displacement from frame 0 about `total_nm`."""
    f = np.arange(n_frames) / max(n_frames - 1, 1)
    x = 0.75 * f + 0.15 * np.sin(3 * np.pi * f)
    y = 0.5 * f**2 - 0.1 * np.sin(2 * np.pi * f)
    curve = np.column_stack([x, y])
    return curve / np.hypot(curve[:, 0], curve[:, 1]).max() * total_nm


def simulate_drifting_stack(path: Path, n_frames: int, *, drift_total_nm: float = 200.0, size_px: int = 64,
                            seed: int = 0, activation_mw: float = 60.0, excitation_mw: float = 50.0,
                            exposure_ms: float = 20.0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Write the stack to `path`; returns its truth table (with `id`, the molecule; positions with the drift,
    as the camera saw them) and the drift curve (n_frames, 2) in nm."""
    config = SimulationConfig()
    config.camera.width_px = config.camera.height_px = size_px
    scope = SimulatedMicroscope(config, seed=seed, keep_truth=False)
    scope.activation_mw, scope.excitation_mw = activation_mw, excitation_mw
    base = scope.positions_nm.copy()
    drift = drift_curve_nm(n_frames, drift_total_nm)
    truths = []

    def frames():
        for t in range(n_frames):
            scope.positions_nm = base + [drift[t, 0], drift[t, 1], 0.0]
            frame, truth = scope.snap(exposure_ms)
            truths.append(truth)
            yield frame

    pixel_um = config.camera.pixel_size_nm / 1000
    with tifffile.TiffWriter(path, ome=True, bigtiff=True) as tif:
        tif.write(frames(), shape=(n_frames, size_px, size_px), dtype=np.uint16,
                  metadata={"axes": "TYX", "PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm"})
    return truth_table(truths), drift


def match_to_truth(table: dict[str, np.ndarray], truth: dict[str, np.ndarray], tolerance_nm: float = 100.0
                   ) -> np.ndarray:
    """The true molecule (`id`) of each localization: the nearest emitter of its frame within
    tolerance_nm, one localization per emitter (closest first); -1 where none."""
    from scipy.optimize import linear_sum_assignment

    molecule = np.full(len(table["frame"]), -1, np.int64)
    t_order = np.argsort(truth["frame"], kind="stable")
    t_frames = truth["frame"][t_order]
    for f in np.unique(table["frame"]):
        rows = np.flatnonzero(table["frame"] == f)
        lo, hi = np.searchsorted(t_frames, [f, f + 1])
        cand = t_order[lo:hi]
        if not len(cand):
            continue
        d = np.hypot(table["x [nm]"][rows, None] - truth["x [nm]"][None, cand],
                     table["y [nm]"][rows, None] - truth["y [nm]"][None, cand])
        r, c = linear_sum_assignment(np.where(d <= tolerance_nm, d, 1e9))
        ok = d[r, c] <= tolerance_nm
        molecule[rows[r[ok]]] = truth["id"][cand[c[ok]]]
    return molecule
