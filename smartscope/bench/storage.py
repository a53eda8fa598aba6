"""Storage at the camera's rate: 2048² uint16 frames through the real FrameWriter, against `dd` to the same disk.

An sCMOS camera gives 2048² uint16 frames at 100 frames/s (0.84 GB/s). In one
run, on one disk (a fresh folder under `directory`, else the temp folder:
`TMPDIR=/data smartscope bench storage` measures /data; removed afterwards,
each file as soon as it is checked; a tmpfs is named as such in the table):

- `dd` with direct I/O (`oflag=direct`, no page cache: what the disk takes)
  and buffered (`conv=fsync`: what the page cache lets through), each
  writing as many bytes as the frames;
- the FrameWriter (`smartscope.storage.frames`) in each format (OME-TIFF,
  the default, and OME-Zarr), twice: fed as fast as it takes frames
  ("unpaced": its sustained rate) and fed at the camera's `rate_hz`
  ("paced": does it keep up?). The time runs from the first `put` to the
  last byte on disk (`close`, then `sync`: also whatever else the machine
  had not written yet, so never less than the writer's own time).

Frames are made from a few pre-generated random frames (incompressible, like
camera noise) whose first row carries the frame's index and a per-index
pattern, so every frame differs, costs the feeder next to nothing (a pool of
buffers, each reused once its frame is written) and can be regenerated:
every frame is read back and compared bit-exact. Reported beside each pass:
the peak of the bytes held by frames not yet on disk
(`FrameWriter.peak_pending_bytes`), the puts that found no room and waited
for the disk (`held`: a camera held up), and for the paced pass the feeder's
worst lateness against the camera's clock (on a loaded machine also its own
scheduling) and whether the writer kept up: no put held and the whole run to
the writer's `close` (which fsyncs its files; the `sync` after it also
flushes other processes' data) at ≥ 98 % of the camera's rate.

25 GB (3000 frames) is more than the page cache of the machines this runs
on, so the unpaced figure is the disk path's, not memory's. The load average
(`os.getloadavg`) is reported: other work on the machine shares the disk and
the CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from smartscope.storage.frames import FrameWriter, read_frames

SHAPE = (2048, 2048)
DTYPE = np.dtype(np.uint16)
FRAME_BYTES = SHAPE[0] * SHAPE[1] * DTYPE.itemsize
FRAMES, QUICK_FRAMES = 3000, 300
RATE_HZ = 100.0
BASE_FRAMES = 8  # distinct random frames the stream is made from
SEED = 32
KEPT_UP_SHARE = 0.98
FORMATS = ("tiff", "zarr")
MAX_PENDING_MB = 1024.0  # storage.max_pending_mb's default
SPARE_BYTES = 2 << 30  # left free on the disk beyond the largest file written


class _Frames:
    """Frame i: base frame i % BASE_FRAMES with row 0 replaced by a pattern seeded by i (its index in pixels 0–1).

    Made in a pool of `pool` buffers (a multiple of BASE_FRAMES), frame i in buffer i % pool, its row 0 rewritten:
    a camera's frames cost the writer nothing to make, and so must these (a copy of 8 MB per frame took 40 % of
    a core here). A buffer is reused only once its frame is written: the writer holds at most max_pending frames
    not yet written, in order, so pool > max_pending suffices; the read-back would show any frame overwritten.
    """

    def __init__(self, pool: int, seed: int = SEED) -> None:
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 1 << 16, (BASE_FRAMES, *SHAPE), dtype=DTYPE)
        self.pool = [base[k % BASE_FRAMES].copy() for k in range(-(-pool // BASE_FRAMES) * BASE_FRAMES)]
        self.base = base

    def row0(self, i: int) -> np.ndarray:
        row = np.random.default_rng((SEED, i)).integers(0, 1 << 16, SHAPE[1], dtype=DTYPE)
        row[:2] = (i & 0xFFFF, i >> 16)
        return row

    def make(self, i: int) -> np.ndarray:
        frame = self.pool[i % len(self.pool)]
        frame[0] = self.row0(i)
        return frame

    def matches(self, i: int, frame: np.ndarray) -> bool:
        return bool(np.array_equal(frame[1:], self.base[i % BASE_FRAMES][1:])
                    and np.array_equal(frame[0], self.row0(i)))


def _fs_type(path: Path) -> str:
    """The file system `path` lies on (from /proc/mounts: the longest mount point above it)."""
    best, kind = "", "unknown"
    path_s = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, fstype, *_ = line.split()
        if (path_s == mount or path_s.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


def _dd(folder: Path, n_frames: int, direct: bool) -> dict:
    """`dd` of n_frames × FRAME_BYTES in blocks of one frame: direct I/O, or buffered with a final fsync."""
    target = folder / "dd.bin"
    flag = "oflag=direct" if direct else "conv=fsync"
    t0 = time.perf_counter()
    done = subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={FRAME_BYTES}", f"count={n_frames}", flag],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    target.unlink()
    match = re.search(r"copied, ([\d.]+) s", done.stderr)
    seconds = float(match.group(1)) if match else seconds
    return {"frames_per_s": n_frames / seconds, "gb_per_s": n_frames * FRAME_BYTES / seconds / 1e9,
            "seconds": seconds}


def _write(folder: Path, fmt: str, frames: _Frames, n_frames: int, rate_hz: float | None) -> dict:
    """One pass through FrameWriter: fed back to back (rate_hz None) or at rate_hz; then every frame read back."""
    folder.mkdir()
    writer = FrameWriter(folder, SHAPE, DTYPE, 100.0, format=fmt, max_pending_bytes=MAX_PENDING_MB * 1e6)
    late_s = 0.0
    t0 = time.perf_counter()
    for i in range(n_frames):
        frame = frames.make(i)
        if rate_hz is not None:
            due = t0 + i / rate_hz
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            late_s = max(late_s, time.perf_counter() - due)
        writer.put(frame, {"frame": i})
        del frame
    held = writer.puts_waited
    saved = writer.close()
    closed_s = time.perf_counter() - t0
    os.sync()  # everything on disk (fsync of each of 3000 Zarr chunks would flush the disk's cache 3000 times)
    seconds = time.perf_counter() - t0
    bad = _verify(writer.path, fmt, frames, n_frames)
    shutil.rmtree(folder)
    rate = n_frames / seconds
    out = {"frames_per_s": rate, "gb_per_s": n_frames * FRAME_BYTES / seconds / 1e9, "seconds": seconds,
           "saved": saved, "read_back_bit_exact": n_frames - bad, "mismatched": bad,
           "peak_pending_mb": writer.peak_pending_bytes / 1e6, "max_pending_mb": writer.max_pending * FRAME_BYTES / 1e6,
           "puts_held": held}
    if rate_hz is not None:
        out["max_late_ms"] = late_s * 1e3
        out["frames_per_s_to_close"] = n_frames / closed_s
        out["kept_up"] = bool(held == 0 and n_frames / closed_s >= KEPT_UP_SHARE * rate_hz)
    return out


def _verify(path: Path, fmt: str, frames: _Frames, n_frames: int) -> int:
    """Frames that differ from what was written (a missing frame counts as different)."""
    if fmt == "tiff":
        data = read_frames(path)
    else:
        import tensorstore as ts

        data = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "0")}}).result()
    if data.shape[0] != n_frames:
        return n_frames
    bad = 0
    for i in range(n_frames):
        frame = data[i] if fmt == "tiff" else data[i].read().result()
        bad += not frames.matches(i, np.asarray(frame))
    return bad


def run(quick: bool = False, directory: str | None = None, frames: int | None = None,
        rate_hz: float = RATE_HZ) -> dict:
    n_frames = frames or (QUICK_FRAMES if quick else FRAMES)
    parent = Path(directory or tempfile.gettempdir())
    need = n_frames * FRAME_BYTES * 1.02 + SPARE_BYTES  # one pass's files at a time (each removed once checked)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise ValueError(f"{n_frames} frames of {SHAPE[0]}×{SHAPE[1]} need {need / 1e9:.1f} GB free on {parent}; "
                         f"{free / 1e9:.1f} GB are (fewer frames: frames=…)")
    fs = _fs_type(parent)
    folder = Path(tempfile.mkdtemp(prefix="smartscope-bench-storage-", dir=parent))
    print(f"{n_frames} frames of {SHAPE[0]}×{SHAPE[1]} {DTYPE} ({n_frames * FRAME_BYTES / 1e9:.1f} GB) to {folder} "
          f"({fs}, {free / 1e9:.0f} GB free); camera rate {rate_hz:g} frames/s = "
          f"{rate_hz * FRAME_BYTES / 1e9:.2f} GB/s; load average {os.getloadavg()[0]:.2f}")
    results: dict = {"frames": n_frames, "frame_shape": list(SHAPE), "dtype": str(DTYPE), "rate_hz": rate_hz,
                     "directory": str(parent), "file_system": fs, "free_gb_before": free / 1e9,
                     "load_average_before": os.getloadavg()[0], "passes": {}}
    header = (f"{'pass':<22}{'frames/s':>9}{'GB/s':>7}{'s':>7}{'exact':>11}{'peak pending MB':>17}{'held':>6}"
              f"{'late ms':>9}{'kept up':>9}{'load':>6}")
    print(header)
    source = _Frames(pool=int(MAX_PENDING_MB * 1e6 // FRAME_BYTES) + 2)
    try:
        passes = [("dd direct", lambda: _dd(folder, n_frames, direct=True)),
                  ("dd buffered", lambda: _dd(folder, n_frames, direct=False))]
        for fmt in FORMATS:
            for paced in (False, True):
                name = f"{fmt} {'paced' if paced else 'unpaced'}"
                sub = folder / name.replace(" ", "-")
                passes.append((name, lambda fmt=fmt, paced=paced, sub=sub:
                               _write(sub, fmt, source, n_frames, rate_hz if paced else None)))
        for name, measure in passes:
            row = measure()
            row["load_average"] = os.getloadavg()[0]
            results["passes"][name] = row
            exact = f"{row['read_back_bit_exact']}/{n_frames}" if "saved" in row else "-"
            pending = f"{row['peak_pending_mb']:.0f} / {row['max_pending_mb']:.0f}" if "saved" in row else "-"
            kept = {True: "yes", False: "NO"}.get(row.get("kept_up"), "-")
            print(f"{name:<22}{row['frames_per_s']:>9.1f}{row['gb_per_s']:>7.2f}{row['seconds']:>7.1f}{exact:>11}"
                  f"{pending:>17}{row.get('puts_held', '-'):>6}{row.get('max_late_ms', float('nan')):>9.1f}"
                  f"{kept:>9}{row['load_average']:>6.2f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    direct = results["passes"]["dd direct"]["gb_per_s"]
    for fmt in FORMATS:
        unpaced = results["passes"][f"{fmt} unpaced"]
        results[f"{fmt}_vs_dd_direct"] = unpaced["gb_per_s"] / direct
        results[f"{fmt}_goal_met"] = bool(unpaced["frames_per_s"] >= rate_hz
                                          and results["passes"][f"{fmt} paced"]["kept_up"]
                                          and unpaced["mismatched"] == 0)
    print("goal (≥ {:g} frames/s unpaced, kept up paced, every frame bit-exact): {}".format(
        rate_hz, ", ".join(f"{fmt} {'met' if results[f'{fmt}_goal_met'] else 'NOT met'} "
                           f"({results[f'{fmt}_vs_dd_direct']:.0%} of dd direct)" for fmt in FORMATS)))
    return results
