"""Lossless storage of every frame through pymmcore-plus's ome-writers sink, plus a per-frame index table.

- **Formats.** OME-TIFF (`frames.ome.tif`; one file per stage position,
  `frames/frames_p000.ome.tif`, … when the plan has several) or OME-Zarr
  (`frames.ome.zarr`, tensorstore), chosen by `storage.format`.
- **Layout.** A multi-dimensional plan is written with its dimensions
  (t, p, c, z, y, x as useq orders them), so Fiji, napari and OME-Zarr readers
  open the experiment. A pure time-lapse, whose length the run decides (a
  stop, the policies), is written flat and unbounded along t: the layout
  ome-writers recommends for event-driven data. Either way `frames.csv` gives
  every saved frame, in the order taken, its MDA index (t, p, g, c, z), the
  channel preset and the acquisition state at capture.
- **Never drops, bounded memory.** Frames are queued and written by a thread
  of their own, so a slow disk does not hold up the camera; the queue holds
  at most `max_pending_bytes` (storage.max_pending_mb). Beyond that `put`
  waits for the disk (the camera is slowed to what the disk takes), and after
  STALL_S without room it raises: the run then stops, rather than a camera
  faster than the disk filling the daemon's memory. A
  frame the camera did not deliver (a gap in the plan's order) is skipped in
  the sink, so every later frame still lands at its own index.
- **After a crash.** OME-TIFF: the pixels of every frame written are on
  disk, one after the other behind the first page (tifffile's contiguous
  writes: the other pages' tags and the OME-XML are written at close); a
  reader of such a cut file sees one page, `frames_on_disk` and
  `read_frames` see them all. OME-Zarr: every frame is
  its own chunk, written as it comes, under metadata written at the start, so
  a reader sees each frame written before the crash and the fill value (0)
  for the rest. `frames.csv` is flushed with every frame.
"""

from __future__ import annotations

import csv
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import ome_types  # noqa: F401 - imported here, with the daemon: ome-writers would import it at the first run (1.2 s)
import tifffile
from ome_writers import AcquisitionSettings
from pymmcore_plus.mda._generator_sequence import GeneratorMDASequence
from pymmcore_plus.mda._sink import OmeWritersSink

if TYPE_CHECKING:
    import useq

#: one row per saved frame, in the order taken: its MDA index (useq: time point, position, grid tile, channel,
#: z slice; the channel preset by name) and the acquisition state at capture
STATE_COLUMNS = ("frame", "t_s", "t", "p", "g", "c", "z", "channel", "exposure_ms", "interval_ms", "activation_mw",
                 "excitation_mw", "x_um", "y_um", "z_um", "angle_deg")
#: storage.format → (ome-writers format, file name in the run folder)
FORMATS = {"tiff": ("ome-tiff", "frames.ome.tif"), "zarr": ("ome-zarr", "frames.ome.zarr")}
_END = object()
STALL_S = 10.0  # a full queue this long: the disk cannot keep up, and `put` raises


class _Sink(OmeWritersSink):
    def append_pixels(self, frame: np.ndarray) -> None:
        """A frame without per-plane metadata (OmeWritersSink.append always builds it)."""
        self._stream.append(frame)


class FrameWriter:
    """`put` frames in the order taken; `close` finishes the files (the OME metadata) and returns frames saved.

    `sequence`: the plan, written with its dimensions; None for a time-lapse (flat, unbounded t).
    `summary_meta`: pymmcore-plus's summary metadata of the run (stored in the files), if known.
    """

    def __init__(self, out_dir: Path, shape: tuple[int, int], dtype: np.dtype, pixel_size_nm: float, *,
                 sequence: useq.MDASequence | None = None, summary_meta: dict[str, Any] | None = None,
                 format: Literal["tiff", "zarr"] = "tiff", max_pending_bytes: float = 1 << 30) -> None:  # noqa: A002
        ome_format, name = FORMATS[format]
        self.path = Path(out_dir) / name
        self.state_path = Path(out_dir) / "frames.csv"
        height, width = shape
        info = {"width": width, "height": height, "dtype": str(np.dtype(dtype)),
                "pixel_size_um": pixel_size_nm / 1000}  # the calibrated camera, whatever the core was told
        meta = dict(summary_meta or {})
        meta["image_infos"] = [{**(meta.get("image_infos") or [{}])[0], **info}]
        self._sink = _Sink(AcquisitionSettings(root_path=str(self.path), format=ome_format))
        self._sink.setup(sequence if sequence is not None else GeneratorMDASequence(), meta)
        if not self.path.exists():  # OME-TIFF of several positions: a folder with one file per position
            self.path = self.path.with_name(name.split(".")[0])
        self._ordered = sequence is not None  # frames land at their index in the plan: gaps are skipped
        self._next_ordinal = 0
        frame_bytes = height * width * np.dtype(dtype).itemsize
        self.max_pending = max(2, int(max_pending_bytes // frame_bytes))
        self._queue: queue.Queue = queue.Queue(maxsize=self.max_pending)
        self.saved = 0
        self.error: BaseException | None = None
        self._state_fh = open(self.state_path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._state = csv.writer(self._state_fh)
        self._state.writerow(STATE_COLUMNS)
        self._thread = threading.Thread(target=self._run, name="frame-writer", daemon=True)
        self._thread.start()

    def put(self, frame: np.ndarray, state: dict, event: useq.MDAEvent | None = None,
            meta: dict[str, Any] | None = None, ordinal: int | None = None) -> None:
        """Queue one frame (the caller hands it over and must not modify it afterwards).

        `ordinal`: the frame's place in the plan (0-based), for a plan written with its dimensions.
        RuntimeError once writing has failed (e.g. the disk is full): nothing more is queued for nothing.
        """
        if self.error is not None or not self._thread.is_alive():
            raise RuntimeError(f"writing {self.path} failed: {self.error or 'the writer stopped'}")
        try:
            self._queue.put((frame, state, event, meta or {}, ordinal), timeout=STALL_S)
        except queue.Full:
            raise RuntimeError(f"storage cannot keep up: {self.max_pending} frames have waited for the disk for "
                               f"{STALL_S:g} s (storage.max_pending_mb); acquire slower or onto a faster disk") from None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not _END:
                frame, state, event, meta, ordinal = item
                if self._ordered and ordinal is not None:
                    if ordinal > self._next_ordinal:
                        self._sink.skip(frames=ordinal - self._next_ordinal)
                    self._next_ordinal = ordinal + 1
                if self._ordered:
                    self._sink.append(frame, event, {"runner_time_ms": 0.0, "exposure_ms": 0.0, **meta})
                else:  # a time-lapse: per-plane OME metadata would cost ~0.25 ms a frame; frames.csv has it all
                    self._sink.append_pixels(frame)
                self._state.writerow([state.get(c, "") for c in STATE_COLUMNS])
                self._state_fh.flush()
                self.saved += 1
        except BaseException as e:  # surfaced by close()
            self.error = e
        finally:
            for close in (self._sink.close, self._state_fh.close):
                try:
                    close()
                except Exception as e:  # e.g. the disk is full: kept for close() to report
                    self.error = self.error or e
            # its buffers, OME model and file buffers go: the daemon keeps every run's record, not its writer
            self._sink = self._state_fh = self._state = None

    def close(self, timeout_s: float | None = None) -> int:
        """Finish writing (everything queued is written); returns frames saved."""
        while self._thread.is_alive():  # room for the end mark as the writer drains (none if it died)
            try:
                self._queue.put(_END, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join(timeout_s)
        if self.error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self.error}") from self.error
        return self.saved


def _contiguous_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype, int] | None:
    """(offset of the first frame, frame shape, dtype, frames whose bytes are on disk) of an OME-TIFF cut short
    by a crash (one page, written contiguously); None for a file closed properly (all its pages are there)."""
    with tifffile.TiffFile(path) as tif:
        if len(tif.pages) > 1:
            return None
        page = tif.pages[0]
        if not page.is_contiguous or page.is_ome and tif.series[0].shape != page.shape:
            return None
        offset, shape, dtype, frame_bytes = page.dataoffsets[0], page.shape, page.dtype, page.nbytes
    return offset, shape, dtype, (Path(path).stat().st_size - offset) // frame_bytes


def frames_on_disk(path: Path) -> int:
    """Frames whose pixels an OME-TIFF holds, also when the writer was killed before it could close the file."""
    layout = _contiguous_layout(path)
    if layout is not None:
        return layout[3]
    with tifffile.TiffFile(path) as tif:
        return len(tif.pages)


def read_frames(path: Path) -> np.ndarray:
    """Every frame in an OME-TIFF as (frames, y, x), memory-mapped where possible; a file cut short by a crash
    gives the frames that are wholly on disk."""
    layout = _contiguous_layout(path)
    if layout is None:
        try:
            return tifffile.memmap(path, mode="r")
        except ValueError:  # compressed or not contiguous
            return tifffile.imread(path)
    offset, shape, dtype, n = layout
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n, *shape))
