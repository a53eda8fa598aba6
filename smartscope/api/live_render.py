"""What the console shows live: SMLM renders of a run, and the newest frames' own results.

`GET /acquisitions/{id}/render.png` renders a run's localization table as it grows.

A run appends to localizations.csv and inference.csv as results arrive. Re-reading a
table of millions of rows for every refresh of the console would cost the daemon
more than the render itself, so each run's tables are read incrementally: only the
complete rows written since the last request are parsed (the writer may be
mid-line), and the frame → MDA position/channel map from inference.csv lets a
render keep to one field and channel.

`GET /results/{frame}`: the daemon keeps only its newest result, which is a few
frames behind or ahead of the newest frame when a page fetches both; the last
RECENT_RESULTS results are kept by frame so that the page draws a frame with
its own localizations.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from smartscope.render import render_localizations

#: inference results kept by frame number (`GET /results/{frame}`): a page asks within a second of the frame
RECENT_RESULTS = 512
#: the largest render served (pixels): beyond it, ask for a larger pixel_nm or a smaller region
MAX_RENDER_PIXELS = 4096 * 4096
READ_CHUNK_BYTES = 1 << 20  # table bytes parsed at once (~15 k rows, ~30 ms)
_RUNS_KEPT = 4  # runs whose tables stay in memory (the running one and a few just looked at)


class _TableTail:
    """The complete rows appended to a CSV since the last `read`, as floats of the named columns."""

    def __init__(self, path: Path, columns: tuple[str, ...]) -> None:
        self.path, self.columns = path, columns
        self._offset = 0
        self._usecols: list[int] | None = None

    def read(self, max_bytes: int = READ_CHUNK_BYTES) -> np.ndarray:
        """At most about max_bytes of new rows (empty: nothing new)."""
        empty = np.empty((0, len(self.columns)))
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read(max_bytes)
        except FileNotFoundError:
            return empty
        end = chunk.rfind(b"\n") + 1  # a row still being written waits for the next read
        if end == 0:
            return empty
        self._offset += end
        lines = chunk[:end]
        if self._usecols is None:
            header, _, lines = lines.partition(b"\n")
            names = next(csv.reader([header.decode("utf-8")]))
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise ValueError(f"{self.path.name} has no column {missing[0]!r}")
            self._usecols = [names.index(c) for c in self.columns]
            if not lines.strip():  # the header alone: go on to the rows
                return self.read(max_bytes)
        if not lines.strip():
            return empty
        return np.loadtxt(io.BytesIO(lines), delimiter=",", usecols=self._usecols, ndmin=2)


class RunLocalizations:
    """One run's localizations so far: x, y, z (nm) and the frame each came from, with the frames' MDA index."""

    def __init__(self, out_dir: Path) -> None:
        self._locs = _TableTail(Path(out_dir) / "localizations.csv", ("frame", "x [nm]", "y [nm]", "z [nm]"))
        self._index = _TableTail(Path(out_dir) / "inference.csv", ("frame", "p", "c"))
        self._rows = np.empty((0, 4))
        self._pc = np.full((0, 2), -1, dtype=np.int64)  # (p, c) by frame number; -1: not known yet
        self._lock = threading.Lock()

    def update(self) -> None:
        """Read what the run added since the last update, a chunk at a time: between chunks the GIL goes to
        the daemon's threads (the first read of a long run's table takes seconds)."""
        with self._lock:
            chunks = [self._rows]
            while len(new := self._locs.read()):
                chunks.append(new)
                time.sleep(0)
            self._rows = np.concatenate(chunks)
            while len(index := self._index.read().astype(np.int64)):
                top = int(index[:, 0].max()) + 1
                if top > len(self._pc):
                    self._pc = np.concatenate([self._pc, np.full((top - len(self._pc), 2), -1, np.int64)])
                self._pc[index[:, 0]] = index[:, 1:]
                time.sleep(0)

    def select(self, position: int | None = None, channel: int | None = None) -> np.ndarray:
        """(N, 3) x, y, z nm of the localizations so far, of one MDA position and/or channel if given."""
        with self._lock:
            rows, pc = self._rows, self._pc
        if position is None and channel is None:
            return rows[:, 1:]
        frames = rows[:, 0].astype(np.int64)
        known = frames < len(pc)
        keep = known.copy()
        for column, wanted in ((0, position), (1, channel)):
            if wanted is not None:
                keep[known] &= pc[frames[known], column] == wanted
        return rows[keep, 1:]


class LiveRenders:
    """The runs' localization tables held for rendering (the last few runs looked at)."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, RunLocalizations] = OrderedDict()
        self._lock = threading.Lock()

    def localizations(self, run_id: str, out_dir: Path) -> RunLocalizations:
        with self._lock:
            runs = self._runs.get(run_id)
            if runs is None:
                runs = self._runs[run_id] = RunLocalizations(out_dir)
                while len(self._runs) > _RUNS_KEPT:
                    self._runs.popitem(last=False)
            self._runs.move_to_end(run_id)
        runs.update()
        return runs

    def render(self, run_id: str, out_dir: Path, extent_nm: tuple[float, float, float, float], pixel_nm: float,
               blur_nm: float | None, colour_by_z: bool, position: int | None = None,
               channel: int | None = None) -> tuple[np.ndarray, int]:
        """The run's localizations inside extent_nm rendered; returns (image, localizations rendered).

        Colour by z spans the z of the whole run (1st..99th percentile), so colours hold while panning.
        ValueError when the render would be larger than MAX_RENDER_PIXELS.
        """
        x0, y0, x1, y1 = extent_nm
        n_px = ((x1 - x0) / pixel_nm) * ((y1 - y0) / pixel_nm)
        if n_px > MAX_RENDER_PIXELS:
            raise ValueError(f"a {x1 - x0:.0f} × {y1 - y0:.0f} nm region at {pixel_nm} nm is {n_px:.3g} pixels, "
                             f"more than {MAX_RENDER_PIXELS}: choose a larger pixel_nm or a smaller region")
        xyz = self.localizations(run_id, out_dir).select(position, channel)
        z_range_nm = tuple(np.percentile(xyz[:, 2], [1, 99])) if colour_by_z and len(xyz) else None
        inside = (xyz[:, 0] >= x0) & (xyz[:, 0] < x1) & (xyz[:, 1] >= y0) & (xyz[:, 1] < y1)
        xyz = xyz[inside]
        image = render_localizations(xyz[:, 0], xyz[:, 1], z_nm=xyz[:, 2] if colour_by_z else None,
                                     pixel_nm=pixel_nm, blur_nm=blur_nm, extent_nm=extent_nm,
                                     z_range_nm=z_range_nm)
        return image, len(xyz)


class RecentResults:
    """The last RECENT_RESULTS inference results by (acquisition, frame); `add` runs on the results thread."""

    def __init__(self, size: int = RECENT_RESULTS) -> None:
        self._size = size
        self._by_frame: OrderedDict[tuple[str, int], dict] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, result: dict | None) -> None:
        if result is None:
            return
        with self._lock:
            self._by_frame[(result["acquisition"], result["frame"])] = result
            while len(self._by_frame) > self._size:
                self._by_frame.popitem(last=False)

    def get(self, acquisition: str | None, frame: int) -> dict | None:
        with self._lock:
            return self._by_frame.get((acquisition, frame))
