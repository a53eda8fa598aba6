"""Every frame reaches the ome-writers sink once; what each format keeps after a crash."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from smartscope.storage import FrameWriter, LocalizationWriter, read_localizations


def _frames(n):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 4000, (24, 32), dtype=np.uint16) for _ in range(n)]


def _read_zarr(path):
    import tensorstore as ts

    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "0")}}).result().read().result()


@pytest.mark.parametrize("fmt", ["tiff", "zarr"])
def test_all_frames_written_lossless(tmp_path, fmt):
    frames = _frames(12)
    w = FrameWriter(tmp_path, (24, 32), np.uint16, pixel_size_nm=160, format=fmt)
    for i, f in enumerate(frames):
        w.put(f, {"frame": i, "z_um": 0.5})
    assert w.close() == 12
    if fmt == "tiff":
        with tifffile.TiffFile(tmp_path / "frames.ome.tif") as tif:
            assert tif.is_ome and tif.series[0].axes == "TYX"
            data = tif.asarray()
            assert 'PhysicalSizeX="0.16"' in tif.ome_metadata
    else:
        data = _read_zarr(tmp_path / "frames.ome.zarr")
    np.testing.assert_array_equal(data, np.stack(frames))
    rows = (tmp_path / "frames.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[1].startswith("0,")


CRASH = """
import os, signal, sys, time
from pathlib import Path
import numpy as np
from smartscope.storage import FrameWriter
w = FrameWriter(Path(sys.argv[1]), (24, 32), np.uint16, 100, format=sys.argv[2])
for i in range(20):
    w.put(np.full((24, 32), i + 1, np.uint16), {"frame": i})
while w.saved < 20:
    time.sleep(0.01)
time.sleep(0.2)  # the sink's own writer thread catches up
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("fmt", ["tiff", "zarr"])
def test_what_a_crash_leaves(tmp_path, fmt):
    """A process killed mid-run (SIGKILL: no close) leaves every frame written and its row in frames.csv.
    OME-Zarr: readable as is. OME-TIFF: the pixels lie in order after the first page (ome-writers writes a
    contiguous series whose page count is finished at close): recovered from the first page's offset."""
    proc = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), fmt], timeout=60)
    assert proc.returncode == -9
    rows = (tmp_path / "frames.csv").read_text().splitlines()
    assert len(rows) == 21
    if fmt == "zarr":
        data = _read_zarr(tmp_path / "frames.ome.zarr")
    else:
        with tifffile.TiffFile(tmp_path / "frames.ome.tif") as tif:
            offset = tif.pages[0].dataoffsets[0]
        data = np.memmap(tmp_path / "frames.ome.tif", np.uint16, "r", offset, (len(rows) - 1, 24, 32))
    assert [int(f[0, 0]) for f in data] == list(range(1, 21))


def test_localization_csv_roundtrip(tmp_path):
    w = LocalizationWriter(tmp_path / "l.csv")
    w.write(3, np.array([[100.0, 200.0, -50.0, 1500.0, 8.0, 0.9]]), 12.5)
    w.write(4, np.zeros((0, 6)), 12.5)
    w.close()
    cols = read_localizations(tmp_path / "l.csv")
    assert list(cols) == ["frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]", "offset [photon]",
                          "uncertainty [nm]"]
    assert cols["frame"].tolist() == [3.0] and cols["x [nm]"][0] == 100.0 and cols["offset [photon]"][0] == 12.5


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB tmpfs (needs root, as CI has): writes fail with ENOSPC once it is full."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_stops_the_run_with_the_lasers_safe(config, full_disk):
    """The disk fills mid-run: the run stops at once as errored (saying why), the lasers go safe, and the
    daemon is free for the next run, instead of acquiring on with frames piling up in memory."""
    from smartscope.service import Daemon

    config.inference.workers = 0
    config.storage.root = str(full_disk)
    config.storage.reserve_mb = 0
    daemon = Daemon(config)
    try:
        run = daemon.start_acquisition(full_disk / "run", 100)  # 64² uint16: 0.8 MB, the disk holds 1 MB ...
        filler = shutil.disk_usage(full_disk).free - 64 * 1024  # ... until something else fills it
        (full_disk / "other").write_bytes(b"x" * filler)
        assert run.done.wait(60)
        assert run.state == "errored" and "No space left on device" in run.error
        assert run.counts.acquired < 90  # stopped at the failure, not at the end of the plan
        assert daemon.actuator.snapshot()["activation_mw"] == 0 and daemon.actuator.snapshot()["excitation_mw"] == 0
        assert not daemon.core.mda.is_running()
    finally:
        daemon.close()


def test_the_demo_refuses_a_run_the_disk_cannot_hold_in_one_sentence(full_disk, tmp_path):
    """Free space is checked before anything moves: the demo exits non-zero with one sentence, no traceback."""
    done = subprocess.run([sys.executable, "-m", "smartscope", "demo", "--frames", "1000", "--out",
                           str(full_disk / "run")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)})
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "free on" in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert not (full_disk / "run").exists()


def test_frames_waiting_for_the_disk_are_bounded(tmp_path, monkeypatch):
    """A camera faster than the disk: at most max_pending frames wait in memory (put waits for room), and a disk
    that stays behind past STALL_S makes put raise instead of letting the daemon's memory fill (fuzzing found
    18 GB: a channel exposure of 1e-311 ms)."""
    from smartscope.storage import frames as frames_mod

    frame = np.zeros((2048, 2048), np.uint16)  # 8 MB: each takes the writer milliseconds
    w = FrameWriter(tmp_path / "ok", frame.shape, np.uint16, 100, max_pending_bytes=3 * frame.nbytes)
    assert w.max_pending == 3
    peak = 0
    for i in range(12):
        w.put(frame, {"frame": i})
        peak = max(peak, w.pending)
    assert peak <= 3 and w.close() == 12

    monkeypatch.setattr(frames_mod, "STALL_S", 0.0)  # no patience: a full queue raises at once
    w = FrameWriter(tmp_path / "slow", frame.shape, np.uint16, 100, max_pending_bytes=2 * frame.nbytes)
    with pytest.raises(RuntimeError, match="storage cannot keep up: 2 frames have waited"):
        for i in range(50):  # back to back: the writer is still on the first when the queue is full
            w.put(frame, {"frame": i})
    assert w.pending <= 2
    assert w.close() >= 2


def _distinct_frames(n, shape):
    """n frames that differ everywhere (a random base plus the index), cheap to make and to check."""
    base = np.random.default_rng(7).integers(0, 60000, shape, dtype=np.uint16)
    return [base + np.uint16(i) for i in range(n)]


@pytest.mark.parametrize("fmt", ["tiff", "zarr"])
def test_frames_streamed_past_the_writeback_window_read_back_bit_exact(tmp_path, fmt, monkeypatch):
    """96 MB of 1024² frames through a writeback window of 8 MB: the file (OME-TIFF) or the chunks (Zarr) are
    handed to the writeback, waited for and dropped from the page cache as they come; every frame comes back
    bit-exact, in order, and the memory held by unsaved frames (this queue and the sink's) stayed within
    max_pending."""
    from smartscope.storage import frames as frames_mod
    from smartscope.storage.frames import frames_on_disk, read_frames

    monkeypatch.setattr(frames_mod, "WRITEBACK_WINDOW_BYTES", 8 << 20)
    monkeypatch.setattr(frames_mod, "WRITEBACK_STEP_BYTES", 2 << 20)
    frames = _distinct_frames(48, (1024, 1024))
    w = FrameWriter(tmp_path, (1024, 1024), np.uint16, 100, format=fmt, max_pending_bytes=6 * frames[0].nbytes)
    for i, f in enumerate(frames):
        w.put(f, {"frame": i})
    assert w.close() == 48
    assert w.pending == 0 and 0 < w.peak_pending_bytes <= 6 * frames[0].nbytes
    if fmt == "tiff":
        data = read_frames(tmp_path / "frames.ome.tif")
        assert frames_on_disk(tmp_path / "frames.ome.tif") == 48
    else:
        data = _read_zarr(tmp_path / "frames.ome.zarr")
    assert data.shape == (48, 1024, 1024)
    assert all(np.array_equal(data[i], f) for i, f in enumerate(frames))


STREAMED_CRASH = """
import os, signal, sys, time
from pathlib import Path
import numpy as np
from smartscope.storage import FrameWriter, frames
frames.WRITEBACK_WINDOW_BYTES, frames.WRITEBACK_STEP_BYTES = 8 << 20, 2 << 20
w = FrameWriter(Path(sys.argv[1]), (1024, 1024), np.uint16, 100, max_pending_bytes=8 << 20)
base = np.random.default_rng(7).integers(0, 60000, (1024, 1024), dtype=np.uint16)
for i in range(60):
    w.put(base + np.uint16(i), {"frame": i})
while w.pending:  # every frame written by the sink (ome-writers' own thread included)
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_streamed_tiff_cut_by_a_crash_keeps_every_frame_written(tmp_path):
    """The streamed OME-TIFF (pages written back and dropped from the cache as it grows, through an 8 MB window)
    killed before close: `read_frames` and `frames_on_disk` still find all 60 frames (120 MB), bit-exact."""
    from smartscope.storage.frames import frames_on_disk, read_frames

    proc = subprocess.run([sys.executable, "-c", STREAMED_CRASH, str(tmp_path)], timeout=120)
    assert proc.returncode == -9
    path = tmp_path / "frames.ome.tif"
    assert frames_on_disk(path) == 60 and len((tmp_path / "frames.csv").read_text().splitlines()) == 61
    data = read_frames(path)
    base = np.random.default_rng(7).integers(0, 60000, (1024, 1024), dtype=np.uint16)
    assert all(np.array_equal(data[i], base + np.uint16(i)) for i in range(60))
