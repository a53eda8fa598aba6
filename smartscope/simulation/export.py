"""`smartscope simulate`: a simulated stack with its exact ground truth, on disk.

The stack is an OME-TIFF (uint16 ADU, as the camera would write it) and the
ground truth a CSV with the same ThunderSTORM-style columns as our
localization output, plus `id` (the molecule), so a localizer can be scored
against it directly. In live mode (`simulation.mode: live`) truth.csv has no
rows (no single emitters) and `events.csv` lists the fission events active in
each frame (`events_table`), so an event detector can be scored against it.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tifffile

from smartscope.simulation.microscope import SimulatedMicroscope, events_table, truth_table

if TYPE_CHECKING:
    from smartscope.config import SmartscopeConfig


def simulate_to_dir(config: SmartscopeConfig, *, n_frames: int, out_dir: Path, seed: int = 0,
                    progress: bool = True) -> dict[str, Path]:
    """Render n_frames at the config's acquisition settings; returns the paths written.

    stack.ome.tif and truth.csv always; events.csv too in live mode.
    """
    if n_frames < 1:
        raise ValueError("n_frames must be >= 1")
    acq = config.acquisition
    scope = SimulatedMicroscope(config.simulation, seed=seed, keep_truth=False)
    scope.activation_mw = acq.activation_mw or 0.0
    scope.excitation_mw = acq.excitation_mw or 0.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stack_path, truth_path = out_dir / "stack.ome.tif", out_dir / "truth.csv"
    truths = []
    pixel_um = config.simulation.camera.pixel_size_nm / 1000

    def frames():
        for i in range(n_frames):
            frame, truth = scope.snap(acq.exposure_ms, acq.interval_ms)
            truths.append(truth)
            if progress and (i + 1) % max(1, n_frames // 10) == 0:
                print(f"  simulated {i + 1}/{n_frames} frames", flush=True)
            yield frame

    with tifffile.TiffWriter(stack_path, ome=True, bigtiff=True) as tif:
        tif.write(frames(), shape=(n_frames, *scope.shape), dtype=np.uint16,
                  metadata={"axes": "TYX", "PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm"})
    _write_csv(truth_path, truth_table(truths))
    paths = {"stack": stack_path, "truth": truth_path}
    if config.simulation.mode == "live":
        paths["events"] = out_dir / "events.csv"
        _write_csv(paths["events"], events_table(truths))
    return paths


def _write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    """Columns to CSV, floats with 3 decimals (nm, photons, s)."""
    columns = list(table)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for row in zip(*(table[c] for c in columns), strict=True):
            writer.writerow([f"{v:.3f}" if isinstance(v, float | np.floating) else v for v in row])
