"""Super-resolution (SMLM) images from localization tables: a Gaussian-blurred 2D histogram.

The picture a microscopist expects from ThunderSTORM's or Picasso's "render":
every localization adds one count to the render pixel it falls in, and the
histogram is blurred by a Gaussian of `blur_nm` (about the localization
precision) so that sparse points read as spots. One renderer serves the live
console (`GET /acquisitions/{id}/render.png`), the offline `smartscope render`
and the analysis pipeline.

Conventions: x is the column axis, y the row axis (row 0 at the smallest y);
render pixel (row i, column j) covers x in [x0 + j·pixel_nm, x0 + (j+1)·pixel_nm)
and likewise in y, with `extent_nm = (x0, y0, x1, y1)`. Intensities are in
localizations per render pixel (the blur keeps the sum), float32.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
from scipy import ndimage

#: the smallest default blur: below ~10 nm a blur would claim a precision SMLM rarely has
MIN_DEFAULT_BLUR_NM = 10.0
#: colour scale of z: the blue .. red stretch of matplotlib's gist_rainbow (as Picasso colours 3D data), every
#: colour at full brightness so that no depth is hidden in the dark end of a map
Z_COLORMAP, Z_COLORMAP_SPAN = "gist_rainbow", (0.75, 0.0)


def default_blur_nm(pixel_nm: float) -> float:
    """The blur when the caller gives none: one render pixel, at least MIN_DEFAULT_BLUR_NM."""
    return max(float(pixel_nm), MIN_DEFAULT_BLUR_NM)


def extent_of(x_nm: np.ndarray, y_nm: np.ndarray, margin_nm: float = 0.0) -> tuple[float, float, float, float]:
    """The bounding box (x0, y0, x1, y1) of the points grown by margin_nm on every side, nm."""
    x, y = np.asarray(x_nm, dtype=float), np.asarray(y_nm, dtype=float)
    if x.size == 0:
        raise ValueError("no localizations to take an extent from: pass extent_nm")
    m = float(margin_nm)
    x0, y0, x1, y1 = float(x.min()) - m, float(y.min()) - m, float(x.max()) + m, float(y.max()) + m
    return x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0)


def render_shape(extent_nm: tuple[float, float, float, float], pixel_nm: float) -> tuple[int, int]:
    """(H, W) render pixels that cover `extent_nm` at `pixel_nm`."""
    x0, y0, x1, y1 = extent_nm
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"extent_nm must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {extent_nm}")
    return max(1, math.ceil((y1 - y0) / pixel_nm - 1e-9)), max(1, math.ceil((x1 - x0) / pixel_nm - 1e-9))


def z_colours(z_nm: np.ndarray, z_range_nm: tuple[float, float] | None = None) -> np.ndarray:
    """(N,) z → (N, 3) RGB in 0..1, blue at the low end of z_range_nm, red at the high end (Z_COLORMAP);
    z_range_nm defaults to the 1st..99th percentile of z."""
    from matplotlib import colormaps

    z = np.asarray(z_nm, dtype=float)
    if z_range_nm is None:
        z_range_nm = tuple(np.percentile(z, [1, 99])) if z.size else (0.0, 1.0)
    lo, hi = z_range_nm
    scaled = np.clip((z - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.full(z.shape, 0.5)
    start, stop = Z_COLORMAP_SPAN
    return colormaps[Z_COLORMAP](start + (stop - start) * scaled)[:, :3]


def render_localizations(x_nm, y_nm, *, z_nm=None, pixel_nm: float = 10.0, blur_nm: float | None = None,
                         extent_nm: tuple[float, float, float, float] | None = None,
                         z_range_nm: tuple[float, float] | None = None) -> np.ndarray:
    """Localizations (N,) x, y in nm → an SMLM image, float32 localizations per render pixel.

    Without z_nm: (H, W). With z_nm: (H, W, 3) RGB coloured by z (`z_colours`, over z_range_nm),
    each channel a blurred histogram weighted by the points' colour, so brightness still counts
    localizations. extent_nm = (x0, y0, x1, y1) defaults to the points' bounding box grown by 3 σ of
    blur, at least one render pixel (spots at the border stay whole); pass the camera field to keep
    the image still while a run grows. Points outside the render pixels (the extent rounded up to whole
    pixels) are left out.
    blur_nm: Gaussian σ, default `default_blur_nm(pixel_nm)`; 0 gives the bare histogram.
    """
    if not pixel_nm > 0:
        raise ValueError(f"pixel_nm must be > 0, got {pixel_nm}")
    x, y = np.asarray(x_nm, dtype=float).ravel(), np.asarray(y_nm, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x_nm and y_nm differ in length: {x.size} vs {y.size}")
    blur_nm = default_blur_nm(pixel_nm) if blur_nm is None else float(blur_nm)
    if blur_nm < 0:
        raise ValueError(f"blur_nm must be ≥ 0, got {blur_nm}")
    margin_nm = max(3 * blur_nm, pixel_nm)
    extent = tuple(map(float, extent_nm)) if extent_nm is not None else extent_of(x, y, margin_nm)
    h, w = render_shape(extent, pixel_nm)
    col = np.floor((x - extent[0]) / pixel_nm)
    row = np.floor((y - extent[1]) / pixel_nm)
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    flat = (row[inside] * w + col[inside]).astype(np.int64)
    sigma_px = blur_nm / pixel_nm

    def blurred(weights: np.ndarray | None) -> np.ndarray:
        counts = np.bincount(flat, weights=None if weights is None else weights[inside], minlength=h * w)
        hist = counts.reshape(h, w).astype(np.float32)
        return ndimage.gaussian_filter(hist, sigma_px, mode="constant") if sigma_px > 0 else hist

    if z_nm is None:
        return blurred(None)
    z = np.asarray(z_nm, dtype=float).ravel()
    if z.shape != x.shape:
        raise ValueError(f"z_nm and x_nm differ in length: {z.size} vs {x.size}")
    colours = z_colours(z, z_range_nm)
    return np.stack([blurred(colours[:, c]) for c in range(3)], axis=-1)


def to_uint8(image: np.ndarray, saturate_percentile: float = 99.5) -> np.ndarray:
    """A render → uint8 for display: 0 stays black, the given percentile of the lit pixels is white.

    Sparse SMLM renders are mostly empty, so the percentile is taken over pixels above zero only.
    RGB (H, W, 3) renders are scaled by their brightest channel so colours keep their hue.
    """
    image = np.asarray(image, dtype=np.float32)
    level = image.max(axis=-1) if image.ndim == 3 else image
    lit = level[level > 0]
    top = float(np.percentile(lit, saturate_percentile)) if lit.size else 1.0
    return (np.clip(image / (top if top > 0 else 1.0), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def write_render_tiff(path: str | Path | BinaryIO, image: np.ndarray, pixel_nm: float) -> Path | BinaryIO:
    """An SMLM render as an ImageJ TIFF that Fiji opens at its scale: float32, pixel size in µm.

    The pixel size goes into the TIFF resolution tags (pixels per µm) and the ImageJ description
    (`unit=um`); an RGB render (H, W, 3) is written as three channels. `path` may be an open binary file.
    """
    import tifffile

    path = Path(path) if isinstance(path, str) else path
    data = np.asarray(image, dtype=np.float32)
    axes = "YX"
    if data.ndim == 3:
        data, axes = np.moveaxis(data, -1, 0), "CYX"
    per_um = 1000.0 / float(pixel_nm)
    tifffile.imwrite(path, data, imagej=True, resolution=(per_um, per_um),
                     metadata={"axes": axes, "unit": "um"})
    return path


def read_tiff_pixel_nm(path: str | Path) -> float:
    """The render pixel size (nm) a TIFF written by write_render_tiff carries (from its resolution tag)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        num, den = page.tags["XResolution"].value
        unit = (tif.imagej_metadata or {}).get("unit", "um")
    if unit not in ("um", "micron", "\\u00B5m", "µm"):
        raise ValueError(f"{path}: resolution unit {unit!r}, expected µm")
    return 1000.0 * den / num


def write_render_png(path: str | Path, image: np.ndarray, pixel_nm: float, saturate_percentile: float = 99.5) -> Path:
    """An SMLM render as an 8-bit PNG for viewing (`to_uint8`), its pixel size in the pHYs chunk (as dpi)."""
    from PIL import Image

    path = Path(path)
    dpi = 25.4e6 / float(pixel_nm)  # render pixels per inch
    Image.fromarray(to_uint8(image, saturate_percentile)).save(path, format="PNG", dpi=(dpi, dpi))
    return path


def render_table(locs_csv: str | Path, out: str | Path, *, pixel_nm: float = 10.0, blur_nm: float | None = None,
                 colour_by_z: bool = False) -> dict[str, object]:
    """`smartscope render`: a ThunderSTORM-style CSV → out (.tif/.tiff: float32 TIFF; .png: 8-bit view)."""
    from smartscope.storage.localizations import read_localizations

    out = Path(out)
    if out.suffix.lower() not in (".png", ".tif", ".tiff"):
        raise ValueError(f"--out must end in .png, .tif or .tiff, got {out.name!r}")
    table = read_localizations(Path(locs_csv))
    missing = [c for c in ("x [nm]", "y [nm]") + (("z [nm]",) if colour_by_z else ()) if c not in table]
    if missing:
        raise ValueError(f"{locs_csv}: no column {missing[0]!r} (columns: {sorted(table)})")
    if table["x [nm]"].size == 0:
        raise ValueError(f"{locs_csv}: no localizations to render")
    image = render_localizations(table["x [nm]"], table["y [nm]"], z_nm=table["z [nm]"] if colour_by_z else None,
                                 pixel_nm=pixel_nm, blur_nm=blur_nm)
    if out.suffix.lower() == ".png":
        write_render_png(out, image, pixel_nm)
    else:
        write_render_tiff(out, image, pixel_nm)
    return {"localizations": int(table["x [nm]"].size), "shape": list(image.shape), "pixel_nm": pixel_nm,
            "out": str(out)}
