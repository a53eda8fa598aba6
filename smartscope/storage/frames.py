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
  of their own, so a slow disk does not hold up the camera. The frames held
  in memory until they are written (`pending_bytes`: this queue and the
  sink's own, ome-writers' TIFF writer thread or tensorstore's writes in
  flight) stay within `max_pending_bytes` (storage.max_pending_mb): the
  sink is handed at most SINK_DEPTH frames ahead of the disk, the queue holds
  the rest. Beyond that `put` waits for the disk (the camera is slowed to
  what the disk takes), and after STALL_S without room it raises: the run
  then stops, rather than a camera faster than the disk filling the daemon's
  memory. A frame the camera did not deliver (a gap in the plan's order) is
  skipped in the sink, so every later frame still lands at its own index.
- **At the camera's rate** (`smartscope bench storage`: 2048² frames, where a
  sCMOS camera gives 100 a second). Buffered writes that outrun the kernel's
  writeback pile up dirty pages until the kernel throttles the writer: the
  OME-TIFF took 2048² frames at 50–58 frames/s (0.42–0.49 GB/s) on a disk
  that takes 1.2–1.3 GB/s of `dd` direct writes. The files are therefore
  streamed (`_Writeback`): their writeback is started right behind the
  writer and, WRITEBACK_WINDOW_BYTES further back, waited for and the pages
  dropped from the cache, so the writer never meets the dirty limit and the
  frames do not push other data out of the page cache. The Zarr time-lapse,
  which ome-writers grows by one frame at every append and waits for, is
  written without tensorstore's fsync of every file (that growth waited
  10–40 ms of a 10 ms frame interval behind the frames' fsyncs: 23–50
  frames/s); its chunks are streamed as the TIFF is. Measured after: 184
  (TIFF) and 170 (Zarr) frames/s flat out, every frame taken at 100
  frames/s with at most 0.39 GB pending. `close` returns with every file on
  disk (fsync).
- **After a crash.** OME-TIFF: the pixels of every frame written are on
  disk, one after the other behind the first page (tifffile's contiguous
  writes: the other pages' tags and the OME-XML are written at close); a
  reader of such a cut file sees one page, `frames_on_disk` and
  `read_frames` see them all. OME-Zarr: every frame is
  its own chunk, written as it comes, under metadata written at the start, so
  a reader sees each frame written before the crash and the fill value (0)
  for the rest. `frames.csv` is flushed with every frame. A crash of the
  process loses nothing written (the page cache survives it); a power cut
  can lose what the writeback had not finished: at most the last
  WRITEBACK_WINDOW_BYTES of frames, and what the file system's journal had
  not committed (ext4: 5 s).
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import errno
import functools
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
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
SINK_DEPTH = 4  # frames handed to the sink ahead of the disk (its writer thread, or tensorstore's concurrent writes)
POLL_S = 0.002  # how often the writer looks whether the sink has room
WRITEBACK_STEP_BYTES = 16 << 20  # a file's new bytes handed to the kernel's writeback in steps of this
#: bytes behind the end of a file left to the writeback before waiting for it (measured, 2048² at 100 frames/s:
#: 64 MB let disk hiccups hold up the camera, 256 MB did not; far below the kernel's dirty limits)
WRITEBACK_WINDOW_BYTES = 256 << 20


class _Writeback:
    """Streams growing files to disk (Linux: sync_file_range, posix_fadvise; elsewhere nothing): new bytes are
    handed to the writeback at once, and bytes WRITEBACK_WINDOW_BYTES behind a file's end are waited for and
    dropped from the page cache. A file's size says how far its writer (another thread) has got."""

    _WRITE, _WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self, paths: list[Path]) -> None:
        self._sync_file_range = _libc_sync_file_range()
        self._files = {}  # fd → [bytes handed to the writeback, bytes on disk and dropped from the cache]
        self._done: deque[tuple[int, int]] = deque()  # files written whole (Zarr chunks): fd, size
        self._done_bytes = 0
        if self._sync_file_range is not None:
            for path in paths:
                self._files[os.open(path, os.O_RDONLY)] = [0, 0]

    def add(self, path: Path) -> None:
        """A file written whole (a Zarr chunk): to the writeback at once, waited for and dropped from the cache
        once WRITEBACK_WINDOW_BYTES of newer ones follow it."""
        if self._sync_file_range is None:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a frame all fill value (0): tensorstore stores no chunk
            return
        size = os.fstat(fd).st_size
        self._sync_file_range(fd, 0, 0, self._WRITE)
        self._done.append((fd, size))
        self._done_bytes += size
        while self._done_bytes > WRITEBACK_WINDOW_BYTES:
            fd, size = self._done.popleft()
            try:
                self._wait_and_drop(fd, 0, size)
            finally:
                os.close(fd)
            self._done_bytes -= size

    def _wait_and_drop(self, fd: int, start: int, length: int) -> None:
        if self._sync_file_range(fd, start, length, self._WAIT) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)

    def advance(self) -> None:
        """Called as the files grow: hands new bytes to the writeback, waits for old ones (the disk's pace)."""
        for fd, marks in self._files.items():
            size = os.fstat(fd).st_size
            if size - marks[0] >= WRITEBACK_STEP_BYTES:
                self._sync_file_range(fd, marks[0], size - marks[0], self._WRITE)
                marks[0] = size
            if marks[0] - marks[1] > WRITEBACK_WINDOW_BYTES:
                end = marks[0] - WRITEBACK_WINDOW_BYTES
                self._wait_and_drop(fd, marks[1], end - marks[1])
                marks[1] = end

    def close(self) -> None:
        """Every file on disk (fsync: with what its writer wrote last, e.g. the TIFF's pages and OME-XML)."""
        fds = [*self._files, *(fd for fd, _ in self._done)]
        self._files, self._done = {}, deque()
        try:
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)


@functools.cache
def _libc_sync_file_range():
    """libc's sync_file_range (Linux), None elsewhere: writes then go through the page cache as they come."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fn = getattr(libc, "sync_file_range", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn.restype = ctypes.c_int
    return fn


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
        self._backend = self._sink._stream._backend
        #: ome-writers' TIFF writers, one per file (their threads count the frames written); None for Zarr
        self._tiff_managers = getattr(self._backend, "_position_managers", None)
        tiffs = [] if format != "tiff" else sorted(self.path.glob("*.ome.tif*")) if self.path.is_dir() else [self.path]
        self._writeback = _Writeback(tiffs)
        self._zarr_chunks = None  # a Zarr time-lapse: where frame t's chunk lies (streamed as the TIFF is)
        if format == "zarr" and sequence is None:
            self._zarr_chunks = self._unsynced_zarr_array()
        self._ordered = sequence is not None  # frames land at their index in the plan: gaps are skipped
        self._next_ordinal = 0
        self.frame_bytes = height * width * np.dtype(dtype).itemsize
        self.max_pending = max(2, int(max_pending_bytes // self.frame_bytes))
        self._queue: queue.Queue = queue.Queue()  # bounded by _room
        self._room = threading.Condition()
        self._held = 0  # frames taken by put and not yet written by the sink (in this queue or the sink's)
        self._handed = 0  # frames (and TIFF placeholders for skipped ones) handed to the sink
        self._placeholders = 0
        self._written = 0  # frames the sink has written, as last seen
        self._futures_done = 0  # tensorstore's writes known finished, in the order issued
        self.peak_pending_bytes = 0  # the most pending_bytes reached
        self.puts_waited = 0  # puts that found no room and waited for the disk (held up the camera)
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
        with self._room:
            self.puts_waited += self._held >= self.max_pending
            room = self._room.wait_for(lambda: self._held < self.max_pending or self.error is not None
                                       or not self._thread.is_alive(), timeout=STALL_S)
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"writing {self.path} failed: {self.error or 'the writer stopped'}")
            if not room:
                raise RuntimeError(f"storage cannot keep up: {self.max_pending} frames have waited for the disk for "
                                   f"{STALL_S:g} s (storage.max_pending_mb); acquire slower or onto a faster disk")
            self._held += 1
            self.peak_pending_bytes = max(self.peak_pending_bytes, self._held * self.frame_bytes)
        self._queue.put((frame, state, event, meta or {}, ordinal))

    @property
    def pending(self) -> int:
        """Frames held in memory, not yet written: queued here or in the sink (at most max_pending)."""
        return self._held

    @property
    def pending_bytes(self) -> int:
        return self.pending * self.frame_bytes

    def _unsynced_zarr_array(self) -> Path:
        """Reopens the time-lapse's array without tensorstore's fsync of every file it writes (file_io_sync) for
        ome-writers to write through, and returns the folder of its chunks. ome-writers grows the array at every
        append and waits for it: 2.5 ms, 10–40 ms with the frames' fsyncs queued before it, of a 10 ms frame
        interval; without the fsync 0.35 ms. The chunks are streamed to disk by _Writeback instead."""
        import tensorstore as ts

        folder = self.path / "0"  # one image (a time-lapse has one position), its full-resolution array
        self._backend._arrays[:] = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}},
                                            open=True, context=ts.Context({"file_io_sync": False})).result()]
        return folder / "c"

    def _sink_backlog(self) -> int:
        """Frames handed to the sink that its writer has not written yet (ome-writers' internals: the TIFF
        writer threads' counts, tensorstore's write futures)."""
        if self._tiff_managers is not None:
            threads = [m.thread for m in self._tiff_managers.values() if m.thread is not None]
            backlog = self._handed - sum(t.frames_written for t in threads)
            if backlog and not all(t.is_alive() for t in threads):  # it stopped on an error it only warns about
                if shutil.disk_usage(self.path.parent).free < self.frame_bytes:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
                raise RuntimeError(f"ome-writers' TIFF writer stopped with {backlog} frames unwritten")
            return backlog
        futures = getattr(self._backend, "_futures", ())
        while self._futures_done < len(futures) and futures[self._futures_done].done():
            futures[self._futures_done].result()  # raises the write's error (e.g. the disk is full)
            if self._zarr_chunks is not None:
                self._writeback.add(self._zarr_chunks / str(self._futures_done) / "0" / "0")
            self._futures_done += 1
        return len(futures) - self._futures_done

    def _wait_for_sink(self, room: int) -> None:
        """Until the sink holds fewer than `room` frames not yet written (the disk's pace); the frames written
        give their room back to `put`."""
        while True:
            backlog = self._sink_backlog()
            written = self._handed - self._placeholders - backlog  # (less the placeholders not yet written)
            if written > self._written:
                with self._room:
                    self._held -= written - self._written
                    self._room.notify_all()
                self._written = written
            if backlog < room:
                return
            self._writeback.advance()
            time.sleep(POLL_S)

    def _run(self) -> None:
        try:
            while True:
                self._wait_for_sink(SINK_DEPTH)
                try:
                    item = self._queue.get(timeout=POLL_S * 5)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                frame, state, event, meta, ordinal = item
                if self._ordered and ordinal is not None:
                    if ordinal > self._next_ordinal:
                        self._sink.skip(frames=ordinal - self._next_ordinal)
                        if self._tiff_managers is not None:  # zero-filled placeholders
                            self._handed += ordinal - self._next_ordinal
                            self._placeholders += ordinal - self._next_ordinal
                    self._next_ordinal = ordinal + 1
                if self._ordered:
                    self._sink.append(frame, event, {"runner_time_ms": 0.0, "exposure_ms": 0.0, **meta})
                else:  # a time-lapse: per-plane OME metadata would cost ~0.25 ms a frame; frames.csv has it all
                    self._sink.append_pixels(frame)
                del frame, item
                self._handed += 1
                self._writeback.advance()
                self._state.writerow([state.get(c, "") for c in STATE_COLUMNS])
                self._state_fh.flush()
                self.saved += 1
        except BaseException as e:  # surfaced by close()
            self.error = e
        finally:
            for close in (self._sink.close, self._finish_files, self._state_fh.close):
                try:
                    close()
                except Exception as e:  # e.g. the disk is full: kept for close() to report
                    self.error = self.error or e
            with self._room:  # nothing is held any more; a put waiting for room sees the error
                self._held = 0
                self._room.notify_all()
            # its buffers, OME model and file buffers go: the daemon keeps every run's record, not its writer
            self._sink = self._backend = self._state_fh = self._state = None

    def _finish_files(self) -> None:
        """After the sink's close: the streamed files on disk, the Zarr array's metadata (its extent) with them."""
        if self._zarr_chunks is not None:
            self._writeback.add(self._zarr_chunks.parent / "zarr.json")
        self._writeback.close()

    def close(self, timeout_s: float | None = None) -> int:
        """Finish writing (everything queued is written, the streamed files on disk); returns frames saved."""
        self._queue.put(_END)  # after every frame queued (put bounds the queue; the end mark needs no room)
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
