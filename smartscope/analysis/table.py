"""The localization table every analysis step takes and returns: columns by ThunderSTORM name.

A table is a dict of equal-length 1-D arrays keyed by the CSV column names
(storage/localizations.py): `frame` (int64, 0-based) and `x [nm]`, `y [nm]`,
`z [nm]`, `intensity [photon]`, `offset [photon]` (background per pixel),
`uncertainty [nm]` (float64); merged tables add `detections` (how many
localizations each row merges). The same dict is what `read_localizations`
returns for a CSV, so each step runs alone on a file as well.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from smartscope.storage.localizations import CSV_COLUMNS, read_localizations

X, Y, Z, PHOTONS, BG, UNC = CSV_COLUMNS[1:]
DETECTIONS = "detections"
_FORMATS = {"frame": "{:d}", X: "{:.2f}", Y: "{:.2f}", Z: "{:.2f}", PHOTONS: "{:.1f}", BG: "{:.2f}",
            UNC: "{:.2f}", DETECTIONS: "{:d}"}


class TableError(ValueError):
    """A localization file that cannot be analysed, with what to do about it."""


def empty_table() -> dict[str, np.ndarray]:
    return {c: np.empty(0, np.int64 if c == "frame" else np.float64) for c in CSV_COLUMNS}


def table_from_rows(frames: np.ndarray, locs: np.ndarray) -> dict[str, np.ndarray]:
    """Frame numbers and (N, 7) rows of LOCALIZATION_COLUMNS (x, y, z, photons, unc, p, bg) → a table."""
    return {"frame": frames.astype(np.int64), X: locs[:, 0], Y: locs[:, 1], Z: locs[:, 2], PHOTONS: locs[:, 3],
            BG: locs[:, 6], UNC: locs[:, 4]}


def concat(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    tables = [t for t in tables if len(t["frame"])] or [empty_table()]
    return {c: np.concatenate([t[c] for t in tables]) for c in tables[0]}


def select(table: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {c: v[keep] for c, v in table.items()}


def read_table(path: Path) -> dict[str, np.ndarray]:
    """A ThunderSTORM-style CSV as a table; TableError naming what is missing."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    try:
        cols = read_localizations(path)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise TableError(f"{path}: not a localization CSV ({e})") from e
    missing = [c for c in ("frame", X, Y) if c not in cols]
    if missing:
        raise TableError(f"{path}: no column {', '.join(repr(m) for m in missing)}; expected ThunderSTORM-style "
                         f"columns {', '.join(CSV_COLUMNS)}")
    n = len(cols["frame"])
    table = {"frame": cols["frame"].astype(np.int64)}
    for c in CSV_COLUMNS[1:]:
        table[c] = cols.get(c, np.zeros(n))
    if DETECTIONS in cols:
        table[DETECTIONS] = cols[DETECTIONS].astype(np.int64)
    return table


def write_table(path: Path, table: dict[str, np.ndarray]) -> None:
    """A table as ThunderSTORM-style CSV (the columns and decimals of `smartscope localize`), atomically."""
    columns = [c for c in (*CSV_COLUMNS, DETECTIONS) if c in table]
    formats = [_FORMATS[c] for c in columns]
    write_csv(path, tuple(columns), ([f.format(v) for f, v in zip(formats, row, strict=True)]
                                     for row in zip(*(table[c].tolist() for c in columns), strict=True)))


def write_csv(path: Path, header: tuple[str, ...], rows) -> None:
    """Rows under a header, written to a temporary name and renamed (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
