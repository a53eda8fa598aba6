"""Lossless storage of every frame: OME-TIFF (tifffile) plus a per-frame state table.

Frames are queued without bound (storage never drops a frame) and written by
a thread of their own, so disk hiccups never stall the acquisition. tifffile
writes an OME series of a declared length as it streams; if the acquisition
ends early, the file is rewritten with exactly the frames that were acquired
(no invented frames).
"""

from __future__ import annotations

import csv
import queue
import threading
from pathlib import Path

import numpy as np
import tifffile

STATE_COLUMNS = ("frame", "t_s", "exposure_ms", "interval_ms", "activation_mw", "excitation_mw",
                 "z_um", "angle_deg")
_END = object()


class FrameWriter:
    def __init__(self, out_dir: Path, n_frames: int, shape: tuple[int, int], dtype: np.dtype,
                 pixel_size_nm: float) -> None:
        self.path = Path(out_dir) / "frames.ome.tif"
        self.state_path = Path(out_dir) / "frames.csv"
        self._n = n_frames
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

    def _frames(self):
        while self.saved < self._n:
            item = self._queue.get()
            if item is _END:
                break
            frame, state = item
            self._state.writerow([state.get(c, "") for c in STATE_COLUMNS])
            self.saved += 1
            yield frame
        # an early end: pad the declared series, then truncate after closing
        for _ in range(self._n - self.saved):
            yield np.zeros(self._shape, self._dtype)

    def _metadata(self) -> dict:
        return {"axes": "TYX", "PhysicalSizeX": self._pixel_um, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": self._pixel_um, "PhysicalSizeYUnit": "µm"}

    def _run(self) -> None:
        try:
            with tifffile.TiffWriter(self.path, ome=True, bigtiff=True) as tif:
                tif.write(self._frames(), shape=(self._n, *self._shape), dtype=self._dtype,
                          metadata=self._metadata())
            if self.saved < self._n:
                self._truncate()
        except BaseException as e:  # surfaced by close()
            self.error = e
        finally:
            self._state_fh.close()

    def _truncate(self) -> None:
        if self.saved == 0:
            self.path.unlink(missing_ok=True)
            return
        kept = tifffile.imread(self.path, key=range(self.saved))
        tmp = self.path.with_suffix(".tmp.tif")
        tifffile.imwrite(tmp, kept.reshape(self.saved, *self._shape), ome=True, bigtiff=True,
                         metadata=self._metadata())
        tmp.replace(self.path)

    def close(self, timeout_s: float | None = None) -> int:
        """Finish writing (everything queued is written); returns frames saved."""
        self._queue.put(_END)
        self._thread.join(timeout_s)
        if self.error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self.error}") from self.error
        return self.saved
