"""Every frame reaches the OME-TIFF; an early stop leaves exactly the acquired frames."""

from __future__ import annotations

import numpy as np
import tifffile

from smartscope.storage import FrameWriter, LocalizationWriter, read_localizations


def _frames(n):
    rng = np.random.default_rng(1)
    return [rng.integers(0, 4000, (24, 32), dtype=np.uint16) for _ in range(n)]


def test_all_frames_written_lossless(tmp_path):
    frames = _frames(12)
    w = FrameWriter(tmp_path, 12, (24, 32), np.uint16, pixel_size_nm=100)
    for i, f in enumerate(frames):
        w.put(f, {"frame": i, "z_um": 0.5})
    assert w.close() == 12
    with tifffile.TiffFile(tmp_path / "frames.ome.tif") as tif:
        assert tif.is_ome
        data = tif.asarray()
    np.testing.assert_array_equal(data, np.stack(frames))
    rows = (tmp_path / "frames.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[1].startswith("0,")


def test_early_stop_keeps_only_real_frames(tmp_path):
    frames = _frames(5)
    w = FrameWriter(tmp_path, 100, (24, 32), np.uint16, pixel_size_nm=100)
    for i, f in enumerate(frames):
        w.put(f, {"frame": i})
    assert w.close() == 5
    data = tifffile.imread(tmp_path / "frames.ome.tif")
    np.testing.assert_array_equal(data, np.stack(frames))


def test_localization_csv_roundtrip(tmp_path):
    w = LocalizationWriter(tmp_path / "l.csv")
    w.write(3, np.array([[100.0, 200.0, -50.0, 1500.0, 8.0, 0.9]]), 12.5)
    w.write(4, np.zeros((0, 6)), 12.5)
    w.close()
    cols = read_localizations(tmp_path / "l.csv")
    assert list(cols) == ["frame", "x [nm]", "y [nm]", "z [nm]", "intensity [photon]", "offset [photon]",
                          "uncertainty [nm]"]
    assert cols["frame"].tolist() == [3.0] and cols["x [nm]"][0] == 100.0 and cols["offset [photon]"][0] == 12.5
