"""The SMLM renderer with numbers: peaks where the points are, counts kept, scale carried into the TIFF."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from smartscope.cli import main
from smartscope.render import (
    read_tiff_pixel_nm,
    render_localizations,
    to_uint8,
    write_render_tiff,
    z_colours,
)
from smartscope.storage import LocalizationWriter

GRID_NM = 200.0


def _grid(n: int = 5, start_nm: float = 105.0) -> tuple[np.ndarray, np.ndarray]:
    """n × n points on a 200 nm grid, at render-pixel centres for 10 nm pixels from 0."""
    g = start_nm + GRID_NM * np.arange(n)
    x, y = np.meshgrid(g, g)
    return x.ravel(), y.ravel()


def test_points_on_a_200_nm_grid_peak_at_their_render_pixels():
    x, y = _grid()
    image = render_localizations(x, y, pixel_nm=10.0, extent_nm=(0, 0, 1000, 1000))
    assert image.shape == (100, 100) and image.dtype == np.float32
    # the local maxima are exactly the 25 grid pixels: rows/columns 10, 30, 50, 70, 90
    peaks = (image == ndimage.maximum_filter(image, size=5)) & (image > 0.01)
    rows, cols = np.nonzero(peaks)
    expected = {(int(r), int(c)) for r in range(10, 100, 20) for c in range(10, 100, 20)}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == expected
    # the blur keeps the count: one localization per point; σ = 10 nm = 1 pixel, so the peak holds 1/(2π) of it
    assert image.sum() == pytest.approx(25.0, rel=1e-4)
    assert image[10, 10] == pytest.approx(1 / (2 * np.pi), rel=0.05)


def test_rows_are_y_and_pixel_size_scales_the_image():
    image = render_localizations([50.0], [250.0], pixel_nm=20.0, blur_nm=0, extent_nm=(0, 0, 400, 300))
    assert image.shape == (15, 20)  # 300 nm high, 400 nm wide at 20 nm
    assert np.argwhere(image == 1.0).tolist() == [[12, 2]]  # y 250 → row 12, x 50 → column 2
    assert image.sum() == 1.0


def test_default_extent_is_the_bounding_box_grown_by_the_blur_and_outside_points_are_left_out():
    x, y = _grid(3)  # 105 .. 505 nm
    bare = render_localizations(x, y, pixel_nm=10.0, blur_nm=0)  # grown by one pixel: 95 .. 515 nm
    assert bare.shape == (42, 42) and bare.sum() == 9 and bare[1, 1] == bare[41, 41] == 1
    image = render_localizations(x, y, pixel_nm=10.0, blur_nm=20)  # 3 σ = 60 nm on each side: 45 .. 565 nm
    assert image.shape == (52, 52) and image.sum() == pytest.approx(9, rel=3e-3)
    assert image[6, 6] == image.max()  # (105, 105) → (105 − 45) / 10
    cropped = render_localizations(x, y, pixel_nm=10.0, blur_nm=0, extent_nm=(0, 0, 300, 300))
    assert cropped.sum() == 1  # only (105, 105) falls inside


def test_colour_by_z_keeps_counts_and_colours_low_and_high_z_apart():
    x, y = np.array([105.0, 505.0]), np.array([105.0, 105.0])
    rgb = render_localizations(x, y, z_nm=[-400.0, 400.0], pixel_nm=10, blur_nm=0, extent_nm=(0, 0, 600, 200))
    assert rgb.shape == (20, 60, 3) and rgb.dtype == np.float32
    low, high = rgb[10, 10], rgb[10, 50]
    assert low.tolist() == pytest.approx(z_colours(np.array([-400.0]), (-400, 400))[0].tolist(), abs=1e-6)
    assert low[2] > low[0] and high[0] > high[2]  # blue at the bottom of the range, red at the top
    assert low.max() == high.max() == 1.0  # both at full brightness
    assert rgb[10, 30].sum() == 0


def test_empty_input_needs_an_extent():
    assert render_localizations([], [], extent_nm=(0, 0, 100, 50)).shape == (5, 10)
    with pytest.raises(ValueError, match="extent_nm"):
        render_localizations([], [])


def test_to_uint8_saturates_the_lit_pixels_not_the_empty_ones():
    image = np.zeros((10, 10), np.float32)
    image[0, :5] = [1, 2, 3, 4, 100]
    out = to_uint8(image, saturate_percentile=75)
    assert out[5, 5] == 0 and out[0, 3] == 255 and out[0, 0] == 64  # 75th percentile of lit pixels is 4


def test_tiff_carries_its_pixel_size(tmp_path):
    x, y = _grid()
    image = render_localizations(x, y, pixel_nm=10.0, extent_nm=(0, 0, 1000, 1000))
    path = write_render_tiff(tmp_path / "sr.tif", image, pixel_nm=10.0)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "um"
        num, den = tif.pages.first.tags["XResolution"].value
        assert num / den == pytest.approx(100.0)  # 100 pixels per µm
        np.testing.assert_array_equal(tif.asarray(), image)
    assert read_tiff_pixel_nm(path) == pytest.approx(10.0)


def test_cli_renders_a_localization_table_to_png_and_tiff(tmp_path):
    x, y = _grid()
    table = LocalizationWriter(tmp_path / "locs.csv")
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        table.write(i, np.array([[xi, yi, 0.0, 1000.0, 10.0]]), 5.0)
    table.close()
    for name in ("sr.tif", "sr.png"):
        assert main(["render", str(tmp_path / "locs.csv"), "--out", str(tmp_path / name), "--pixel-nm", "20"]) == 0
    with pytest.raises(SystemExit, match="must end in .png, .tif or .tiff"):
        main(["render", str(tmp_path / "locs.csv"), "--out", str(tmp_path / "sr.jpg")])
    tif = tifffile.imread(tmp_path / "sr.tif")
    # 105 .. 905 nm grown by 3 σ = 60 nm: 45 .. 965 nm at 20 nm; the grid points at (x − 45) / 20 = 3, 13, ...
    assert tif.shape == (46, 46) and tif.sum() == pytest.approx(25.0, rel=3e-3)  # 3 σ keeps 99.7 % of a spot
    assert read_tiff_pixel_nm(tmp_path / "sr.tif") == pytest.approx(20.0)
    png = Image.open(tmp_path / "sr.png")
    assert png.info["dpi"][0] == pytest.approx(25.4e6 / 20, rel=1e-3)  # the pixel size, as PNG can say it
    png = np.asarray(png)
    assert png.shape == (46, 46) and png[3, 3] == 255 and png[23, 23] == 255 and png[8, 8] == 0


def _write_tables(out_dir, rows, index_rows, tail: bytes = b"") -> None:
    """A run's localizations.csv (frame, x, y, z rows) and inference.csv (frame, p, c rows), as a run writes them;
    `tail` is a row still being written (no newline yet)."""
    from smartscope.acquisition.run import INFERENCE_COLUMNS

    table = LocalizationWriter(out_dir / "localizations.csv")
    for frame, x, y, z in rows:
        table.write(frame, np.array([[x, y, z, 1000.0, 10.0]]), 5.0)
    table.close()
    with open(out_dir / "localizations.csv", "ab") as fh:
        fh.write(tail)
    empty = {c: "" for c in INFERENCE_COLUMNS}
    lines = [",".join(INFERENCE_COLUMNS)]
    for frame, p, c in index_rows:
        lines.append(",".join(str({**empty, "frame": frame, "t": frame, "p": p, "g": 0, "c": c, "z": 0}[k])
                              for k in INFERENCE_COLUMNS))
    (out_dir / "inference.csv").write_text("\n".join(lines) + "\n")


def test_a_growing_table_is_read_by_complete_rows(tmp_path):
    from smartscope.api.live_render import RunLocalizations

    _write_tables(tmp_path, [(0, 105.0, 105.0, 0.0), (1, 305.0, 105.0, 0.0)], [(0, 0, 0), (1, 1, 0)],
                  tail=b"2,505.00,1")  # frame 2's row is half written
    locs = RunLocalizations(tmp_path)
    locs.update()
    assert locs.select().tolist() == [[105.0, 105.0, 0.0], [305.0, 105.0, 0.0]]
    assert locs.select(position=1).tolist() == [[305.0, 105.0, 0.0]]
    with open(tmp_path / "localizations.csv", "ab") as fh:  # the rest of the row, and one more
        fh.write(b"05.00,0.00,1000.0,5.00,10.00\n3,705.00,105.00,0.00,1000.0,5.00,10.00\n")
    locs.update()
    assert locs.select()[:, 0].tolist() == [105.0, 305.0, 505.0, 705.0]
    assert locs.select(position=0).tolist() == [[105.0, 105.0, 0.0]]  # frames 2, 3: position not known yet


def test_a_table_read_in_small_chunks_gives_every_row_once(tmp_path):
    from smartscope.api.live_render import _TableTail

    rows = [(f, 100.0 + f, 200.0 + f, 0.0) for f in range(40)]
    _write_tables(tmp_path, rows, [])
    tail, chunks = _TableTail(tmp_path / "localizations.csv", ("frame", "x [nm]")), []
    while len(chunk := tail.read(max_bytes=100)):  # the 80-byte header, then one or two rows at a time
        chunks.append(chunk)
    assert len(chunks) >= 10
    assert np.concatenate(chunks).tolist() == [[f, 100.0 + f] for f in range(40)]


def test_a_runs_render_over_the_api_is_a_tiff_with_its_pixel_size(tmp_path):
    import httpx
    from conftest import small_config
    from test_api import make_daemon, serve

    from smartscope.api import create_app

    daemon = make_daemon(small_config(), tmp_path)  # a 64 × 64 camera at 100 nm: a 6400 nm field
    try:
        run = daemon.start_acquisition(None, 3)
        assert run.done.wait(30)
        x, y = _grid()  # 25 points, 105 .. 905 nm, in frames 0 (position 0) and 1 (position 1)
        _write_tables(run.out_dir, [(i % 2, xi, yi, 50.0 * i) for i, (xi, yi) in enumerate(zip(x, y, strict=True))],
                      [(0, 0, 0), (1, 1, 0)])
        with serve(create_app(daemon, token=None)) as base, httpx.Client(base_url=base, timeout=30) as client:
            r = client.get(f"/acquisitions/{run.id}/render.tif", params={"pixel_nm": 20})
            assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
            assert r.headers["X-Field-Nm"] == r.headers["X-Extent-Nm"] == "0,0,6400,6400"
            assert r.headers["X-Localizations"] == "25"
            (tmp_path / "sr.tif").write_bytes(r.content)
            image = tifffile.imread(tmp_path / "sr.tif")
            assert image.shape == (320, 320) and read_tiff_pixel_nm(tmp_path / "sr.tif") == pytest.approx(20.0)
            assert image.sum() == pytest.approx(25.0, rel=1e-3)
            assert image[5, 5] == image.max()  # (105, 105) nm at 20 nm pixels
            # one position, a zoomed region, colour by z: as PNG
            r = client.get(f"/acquisitions/{run.id}/render.png", params={
                "pixel_nm": 5, "x0_nm": 0, "y0_nm": 0, "x1_nm": 500, "y1_nm": 500, "position": 1,
                "colour_by_z": True})
            assert r.status_code == 200 and r.headers["X-Localizations"] == "2"  # (305, 105), (105, 305)
            png = np.asarray(Image.open(__import__("io").BytesIO(r.content)))
            assert png.shape == (100, 100, 3) and png[21, 61].max() == 255 and png[21, 21].max() == 0
            # refused with the reason
            assert client.get(f"/acquisitions/{run.id}/render.png", params={"x0_nm": 5}).status_code == 422
            big = client.get(f"/acquisitions/{run.id}/render.png", params={"pixel_nm": 1})
            assert big.status_code == 422 and "larger pixel_nm" in big.json()["detail"]
            assert client.get("/acquisitions/nope/render.png").status_code == 404
    finally:
        daemon.close()
