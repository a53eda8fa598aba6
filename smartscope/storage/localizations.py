"""Localization tables in ThunderSTORM-style CSV, so the field's tools can read them.

Columns: frame (0-based, as everywhere in smartscope), x [nm], y [nm], z [nm],
intensity [photon], offset [photon] (background per pixel), uncertainty [nm].
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]", "offset [photon]",
               "uncertainty [nm]")


class LocalizationWriter:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._fh)
        self._csv.writerow(CSV_COLUMNS)
        self.rows = 0

    def write(self, frame: int, locs: np.ndarray, background_photons: float | None) -> None:
        """locs: (N, ≥5) rows of LOCALIZATION_COLUMNS; the offset column is each row's local
        background where it has one (a 7th column), else the frame's `background_photons`."""
        frame_bg = float(background_photons or 0.0)
        for x, y, z, ph, unc, *rest in np.asarray(locs, dtype=float):
            bg = rest[1] if len(rest) > 1 else frame_bg
            self._csv.writerow([frame, f"{x:.2f}", f"{y:.2f}", f"{z:.2f}", f"{ph:.1f}", f"{bg:.2f}", f"{unc:.2f}"])
            self.rows += 1

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_localizations(path: Path) -> dict[str, np.ndarray]:
    """A ThunderSTORM-style CSV as columns of float arrays."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    data = np.array(body, dtype=float).reshape(len(body), len(header))
    return {name: data[:, i] for i, name in enumerate(header)}
