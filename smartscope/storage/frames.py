"""Lossless storage of every frame: OME-TIFF (tifffile) plus a per-frame index and state table.

Frames are stored flat, in the order they were taken, with `frames.csv`
giving each one's MDA index (t, p, g, c, z) and state: the layout
ome-writers recommends for event-driven data, whose length and order the
policies decide while the run goes on. A frame of a planned experiment is
found at its index through that table.

Frames are queued without bound (storage never drops a frame) and written by
a thread of their own, so disk hiccups never stall the acquisition. Each
frame is written as its own TIFF page with its directory at once, so the file
is a readable multi-page TIFF at every moment, even after a crash; when the
writer closes, the first page's description becomes the OME-XML for exactly
the frames written (no length needs to be known in advance, no frame is
invented when a run stops early).
"""

from __future__ import annotations

import csv
import queue
import threading
from pathlib import Path

import numpy as np
import tifffile

#: one row per saved frame, in file order: its MDA index (useq: time point, position, grid tile, channel,
#: z slice; the channel preset by name) and the acquisition state at capture
STATE_COLUMNS = ("frame", "t_s", "t", "p", "g", "c", "z", "channel", "exposure_ms", "interval_ms", "activation_mw",
                 "excitation_mw", "x_um", "y_um", "z_um", "angle_deg")
IN_PROGRESS = "smartscope: acquisition in progress (OME-XML is written when it closes)"
_END = object()


class FrameWriter:
    def __init__(self, out_dir: Path, shape: tuple[int, int], dtype: np.dtype, pixel_size_nm: float) -> None:
        self.path = Path(out_dir) / "frames.ome.tif"
        self.state_path = Path(out_dir) / "frames.csv"
        self._shape = tuple(shape)
        self._dtype = np.dtype(dtype)
        self._pixel_um = pixel_size_nm / 1000
        self._queue: queue.Queue = queue.Queue()
        self.saved = 0
        self.error: BaseException | None = None
        self._state_fh = open(self.state_path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._state = csv.writer(self._state_fh)
        self._state.writerow(STATE_COLUMNS)
        self._thread = threading.Thread(target=self._run, name="frame-writer", daemon=True)
        self._thread.start()

    def put(self, frame: np.ndarray, state: dict) -> None:
        """Queue one frame; the caller hands it over and must not modify it afterwards."""
        self._queue.put((frame, state))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        try:
            with tifffile.TiffWriter(self.path, bigtiff=True) as tif:
                while (item := self._queue.get()) is not _END:
                    frame, state = item
                    tif.write(frame, metadata=None, description=IN_PROGRESS if self.saved == 0 else None)
                    self._state.writerow([state.get(c, "") for c in STATE_COLUMNS])
                    self.saved += 1
            if self.saved:
                tifffile.tiffcomment(self.path, self._ome_xml())
        except BaseException as e:  # surfaced by close()
            self.error = e
        finally:
            self._state_fh.close()

    def _ome_xml(self) -> str:
        ome = tifffile.OmeXml()
        h, w = self._shape
        # PhysicalSize units default to µm in the OME schema (TIFF tags must stay ASCII)
        ome.addimage(self._dtype, (self.saved, h, w), (self.saved, 1, 1, h, w, 1), axes="TYX",
                     PhysicalSizeX=self._pixel_um, PhysicalSizeY=self._pixel_um)
        return ome.tostring()

    def close(self, timeout_s: float | None = None) -> int:
        """Finish writing (everything queued is written); returns frames saved."""
        self._queue.put(_END)
        self._thread.join(timeout_s)
        if self.error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self.error}") from self.error
        return self.saved
