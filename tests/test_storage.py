"""Every frame reaches the OME-TIFF; an early stop leaves exactly the acquired frames."""

from __future__ import annotations

import time

import numpy as np
import tifffile

from smartscope.storage import FrameWriter, LocalizationWriter, read_localizations


def _frames(n):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 4000, (24, 32), dtype=np.uint16) for _ in range(n)]


def test_all_frames_written_lossless(tmp_path):
    frames = _frames(12)
    w = FrameWriter(tmp_path, (24, 32), np.uint16, pixel_size_nm=100)
    for i, f in enumerate(frames):
        w.put(f, {"frame": i, "z_um": 0.5})
    assert w.close() == 12
    with tifffile.TiffFile(tmp_path / "frames.ome.tif") as tif:
        assert tif.is_ome
        data = tif.asarray()
    np.testing.assert_array_equal(data, np.stack(frames))
    rows = (tmp_path / "frames.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[1].startswith("0,")


def test_readable_while_writing_and_ome_when_closed(tmp_path):
    """No length declared up front; a crash mid-run still leaves a readable TIFF."""
    frames = _frames(5)
    w = FrameWriter(tmp_path, (24, 32), np.uint16, pixel_size_nm=160)
    for i, f in enumerate(frames):
        w.put(f, {"frame": i})
    deadline = time.time() + 10
    while w.saved < 5 and time.time() < deadline:
        time.sleep(0.01)
    with tifffile.TiffFile(tmp_path / "frames.ome.tif") as tif:  # the writer is still open
        assert not tif.is_ome and len(tif.pages) == 5
        np.testing.assert_array_equal(tif.pages[4].asarray(), frames[4])
    assert w.close() == 5
    with tifffile.TiffFile(tmp_path / "frames.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "TYX"
        np.testing.assert_array_equal(tif.asarray(), np.stack(frames))
        assert 'PhysicalSizeX="0.16"' in tif.ome_metadata


def test_localization_csv_roundtrip(tmp_path):
    w = LocalizationWriter(tmp_path / "l.csv")
    w.write(3, np.array([[100.0, 200.0, -50.0, 1500.0, 8.0, 0.9]]), 12.5)
    w.write(4, np.zeros((0, 6)), 12.5)
    w.close()
    cols = read_localizations(tmp_path / "l.csv")
    assert list(cols) == ["frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]", "offset [photon]",
                          "uncertainty [nm]"]
    assert cols["frame"].tolist() == [3.0] and cols["x [nm]"][0] == 100.0 and cols["offset [photon]"][0] == 12.5
