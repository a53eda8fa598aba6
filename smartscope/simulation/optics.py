"""The astigmatic Gaussian PSF, its pixel-integrated rendering, and its CRLB.

Pixel convention (used everywhere in smartscope): pixel k spans [k, k+1) in
pixel units, so its centre is at k + 0.5 and x_nm = x_px * pixel_size_nm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.special import erf

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from smartscope.simulation.config import OpticsConfig

_SQRT2 = np.sqrt(2.0)
_SQRT2PI = np.sqrt(2.0 * np.pi)
_WINDOW_SIGMAS = 4.0  # render each PSF out to ±4 sigma: loses < 1e-4 of its photons


def astigmatic_sigmas_nm(
    z_nm: ArrayLike, optics: OpticsConfig
) -> tuple[np.ndarray, np.ndarray]:
    """PSF widths (nm) at defocus z_nm (Huang et al. 2008, without higher-order terms).

    sigma_x is smallest at z=+c and sigma_y at z=-c, so sigma_x < sigma_y for
    z > 0: the sign of the defocus is visible in the PSF's elongation.
    """
    z = np.asarray(z_nm, dtype=np.float64)
    s0 = optics.sigma0_nm()
    c = optics.astig_focal_offset_nm
    d = optics.astig_depth_nm
    sigma_x = s0 * np.sqrt(1.0 + ((z - c) / d) ** 2)
    sigma_y = s0 * np.sqrt(1.0 + ((z + c) / d) ** 2)
    return sigma_x, sigma_y


def _pixel_fractions(
    centre_px: np.ndarray, sigma_px: np.ndarray, start_px: np.ndarray, size: int
) -> np.ndarray:
    """Fraction of a 1D Gaussian falling in pixels start..start+size-1: (n, size)."""
    edges = start_px[:, None] + np.arange(size + 1)[None, :]
    cdf = erf((edges - centre_px[:, None]) / (_SQRT2 * sigma_px[:, None]))
    return 0.5 * np.diff(cdf, axis=1)


def render_gaussian_psfs(
    shape_px: tuple[int, int],
    x_px: ArrayLike,
    y_px: ArrayLike,
    photons: ArrayLike,
    sigma_x_px: ArrayLike,
    sigma_y_px: ArrayLike,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Expected photons per pixel of pixel-integrated Gaussian PSFs: (H, W) float64.

    Only a window of about ±4 sigma around each emitter is evaluated, batched
    over emitters that share a window size (window half-widths are rounded up to
    powers of two), so cost scales with the number of emitters, not the frame;
    PSFs whose window would cover more than 1/16 of the frame (far out of
    focus) are summed in separable form over the whole frame instead.
    Light falling outside the frame is lost, as on a real sensor. If ``out`` is
    given the PSFs are added into it (e.g. onto a background) and it is returned.
    """
    height, width = int(shape_px[0]), int(shape_px[1])
    x, y, n, sx, sy = (
        np.ravel(a).astype(np.float64, copy=False)
        for a in np.broadcast_arrays(x_px, y_px, photons, sigma_x_px, sigma_y_px)
    )
    image = np.zeros((height, width)) if out is None else out
    if image.shape != (height, width):
        raise ValueError(f"out has shape {image.shape}, expected {(height, width)}")
    if x.size == 0:
        return image
    if np.any(sx <= 0) or np.any(sy <= 0):
        raise ValueError("PSF sigmas must be > 0 px")

    half_px = np.ceil(_WINDOW_SIGMAS * np.maximum(sx, sy))
    # Skip emitters whose whole window misses the frame.
    visible = (
        (x + half_px + 1 > 0)
        & (x - half_px - 1 < width)
        & (y + half_px + 1 > 0)
        & (y - half_px - 1 < height)
        & (n != 0)
    )
    if not np.all(visible):
        x, y, n, sx, sy, half_px = (a[visible] for a in (x, y, n, sx, sy, half_px))
    if x.size == 0:
        return image
    limit = max(height, width)
    bucket = np.minimum(2 ** np.ceil(np.log2(np.maximum(half_px, 2))), limit).astype(np.int64)

    flat = np.zeros(height * width + 1)  # the last bin collects light off the frame
    for half in np.unique(bucket):
        sel = bucket == half
        size = 2 * int(half) + 1
        if 16 * size * size >= height * width:
            # Wide (defocused) PSFs: the separable form over the whole frame,
            # sum_i n_i fy_i fx_i^T = (fy * n)^T @ fx, is cheaper than windows.
            fx = _pixel_fractions(x[sel], sx[sel], np.zeros(sel.sum()), width)
            fy = _pixel_fractions(y[sel], sy[sel], np.zeros(sel.sum()), height)
            _add_outer_products(image, fy * n[sel][:, None], fx)
            continue
        x0 = np.floor(x[sel]).astype(np.int64) - half
        y0 = np.floor(y[sel]).astype(np.int64) - half
        fx = _pixel_fractions(x[sel], sx[sel], x0.astype(np.float64), size)
        fy = _pixel_fractions(y[sel], sy[sel], y0.astype(np.float64), size)
        weights = n[sel][:, None, None] * fy[:, :, None] * fx[:, None, :]
        cols = x0[:, None] + np.arange(size)[None, :]
        rows = y0[:, None] + np.arange(size)[None, :]
        col_ok = (cols >= 0) & (cols < width)
        row_ok = (rows >= 0) & (rows < height)
        index = rows[:, :, None] * width + cols[:, None, :]
        if not (col_ok.all() and row_ok.all()):
            index = np.where(row_ok[:, :, None] & col_ok[:, None, :], index, height * width)
        flat += np.bincount(index.ravel(), weights.ravel(), minlength=flat.size)
    image += flat[:-1].reshape(height, width)
    return image


_NODE_STEP = 0.25  # spacing of the defocus nodes of render_dense_psf, in asinh(z / astig_depth_nm)
_DENSE_MAX_MARGIN_PX = 64


def render_dense_psf(
    shape_px: tuple[int, int],
    x_px: ArrayLike,
    y_px: ArrayLike,
    z_nm: ArrayLike,
    photons: ArrayLike,
    optics: OpticsConfig,
    pixel_size_nm: float,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Expected photons per pixel of a dense label (many point sources) through the astigmatic PSF.

    For continuous structures of thousands of points, where one window per
    point (render_gaussian_psfs) is too slow: the points are splatted
    bilinearly onto a padded canvas per defocus node, and each node's canvas is
    blurred once with that defocus's PSF (scipy.ndimage.gaussian_filter), so
    the cost is a few image filters whatever the number of points. Defocus
    nodes are evenly spaced in asinh(z / astig_depth_nm): 100 nm apart near
    focus, further out of focus where the PSF changes slowly relative to its
    width; a point between two nodes is shared linearly between them, so the
    image changes smoothly with z (the variance of the shared PSF is within
    0.3 % of the exact one). Bilinear splatting adds 1/6 px^2 of variance on
    average and pixel integration 1/12 px^2, so the blur uses sigma^2 - 1/12
    px^2: the result matches the pixel-integrated Gaussian in its first two
    moments. z_nm is each point's defocus; light from points off the frame
    (up to 4 sigma, at most 64 px) enters it. With ``out`` the light is added
    into it.
    """
    height, width = int(shape_px[0]), int(shape_px[1])
    x, y, z, n = (
        np.ravel(a).astype(np.float64, copy=False)
        for a in np.broadcast_arrays(x_px, y_px, z_nm, photons)
    )
    image = np.zeros((height, width)) if out is None else out
    if image.shape != (height, width):
        raise ValueError(f"out has shape {image.shape}, expected {(height, width)}")
    lit = n != 0
    if not lit.all():
        x, y, z, n = x[lit], y[lit], z[lit], n[lit]
    if x.size == 0:
        return image
    depth = optics.astig_depth_nm
    u = np.arcsinh(z / depth) / _NODE_STEP
    node = np.floor(u)
    frac = u - node
    first = int(node.min())
    nodes = np.arange(first, int(node.max()) + 2)
    sx_nodes, sy_nodes = astigmatic_sigmas_nm(depth * np.sinh(nodes * _NODE_STEP), optics)
    sx_nodes, sy_nodes = sx_nodes / pixel_size_nm, sy_nodes / pixel_size_nm
    margin = min(int(np.ceil(_WINDOW_SIGMAS * max(sx_nodes.max(), sy_nodes.max()))) + 1, _DENSE_MAX_MARGIN_PX)
    canvas_h, canvas_w = height + 2 * margin, width + 2 * margin
    plane = canvas_h * canvas_w

    cx = x + (margin - 0.5)  # splat onto pixel centres: pixel k's centre is at k + 0.5
    cy = y + (margin - 0.5)
    ix, iy = np.floor(cx), np.floor(cy)
    fx, fy = cx - ix, cy - iy
    inside = (ix >= 0) & (ix < canvas_w - 1) & (iy >= 0) & (iy < canvas_h - 1)
    if not inside.all():
        ix, iy, fx, fy, n, node, frac = (a[inside] for a in (ix, iy, fx, fy, n, node, frac))
    base = (node.astype(np.int64) - first) * plane + iy.astype(np.int64) * canvas_w + ix.astype(np.int64)
    corners = np.concatenate([base, base + 1, base + canvas_w, base + canvas_w + 1])
    index = np.concatenate([corners, corners + plane])
    wx0, wy0 = 1.0 - fx, 1.0 - fy
    corner_w = np.concatenate([wx0 * wy0, fx * wy0, wx0 * fy, fx * fy])
    weights = np.concatenate([corner_w * np.tile(n * (1.0 - frac), 4), corner_w * np.tile(n * frac, 4)])
    slabs = np.bincount(index, weights, minlength=nodes.size * plane).reshape(nodes.size, canvas_h, canvas_w)
    used = np.bincount(index // plane, minlength=nodes.size) > 0
    crop = (slice(margin, margin + height), slice(margin, margin + width))
    for j in np.flatnonzero(used):
        sigma = (
            np.sqrt(max(sy_nodes[j] ** 2 - 1.0 / 12.0, 0.01)),
            np.sqrt(max(sx_nodes[j] ** 2 - 1.0 / 12.0, 0.01)),
        )
        image += gaussian_filter(slabs[j], sigma, mode="constant", truncate=_WINDOW_SIGMAS)[crop]
    return image


# Largest M*N*K per GEMM call: OpenBLAS keeps products below ~2.6e5 on one
# thread. Handing the whole (tiny) product to its thread pool costs ~100x when
# the cores are busy (inference workers), so the product goes in row blocks.
_GEMM_SINGLE_THREAD_MNK = 200_000


def _add_outer_products(image: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> None:
    """image += fy.T @ fx, i.e. sum_i outer(fy_i, fx_i), in single-threaded GEMM blocks."""
    n, height = fy.shape
    rows = max(1, _GEMM_SINGLE_THREAD_MNK // max(1, n * fx.shape[1]))
    for start in range(0, height, rows):
        image[start : start + rows] += fy[:, start : start + rows].T @ fx


def integrated_gaussian_crlb_nm(
    photons: ArrayLike,
    background_per_px: ArrayLike,
    sigma_nm: ArrayLike,
    pixel_size_nm: float,
    *,
    window_px: int = 15,
    em_excess: float = 1.0,
    sigma_y_nm: ArrayLike | None = None,
    read_noise_e: float = 0.0,
) -> float | np.ndarray:
    """sqrt(CRLB) of x (nm) for a pixel-integrated Gaussian with Poisson noise.

    Inverts the Fisher information over (x, y, N, b) with
    mu_k = N * dEx_k * dEy_k + b on a window_px x window_px window, the emitter
    at the centre of the central pixel. ``photons`` and ``background_per_px``
    are detected counts (photoelectrons); ``em_excess`` multiplies the variance
    (2 for an EMCCD). ``sigma_y_nm`` gives an astigmatic PSF (default: round).
    ``read_noise_e`` (rms electrons, a sCMOS) adds its variance to every pixel's
    (Huang et al. 2013: Fisher information sum (dmu)^2 / (mu + read_noise^2));
    a camera's ADU rounding adds e_per_adu^2 / 12 more, which a caller may fold in.
    Scalars give a float; arrays broadcast and give an array, computed in
    chunks so that a whole truth table is cheap.
    """
    sig_y = sigma_nm if sigma_y_nm is None else sigma_y_nm
    scalar = all(np.ndim(a) == 0 for a in (photons, background_per_px, sigma_nm, sig_y))
    n_ph, bg, sx, sy = (
        np.ravel(a).astype(np.float64)
        for a in np.broadcast_arrays(photons, background_per_px, sigma_nm, sig_y)
    )
    shape = np.broadcast_shapes(
        np.shape(photons), np.shape(background_per_px), np.shape(sigma_nm), np.shape(sig_y)
    )
    sx = sx / pixel_size_nm
    sy = sy / pixel_size_nm
    result = np.empty(n_ph.size)
    chunk = 2048
    for start in range(0, n_ph.size, chunk):
        part = slice(start, start + chunk)
        result[part] = _crlb_x_px(n_ph[part], bg[part], sx[part], sy[part], window_px, read_noise_e**2)
    result *= pixel_size_nm * np.sqrt(em_excess)
    if scalar:
        return float(result[0])
    return result.reshape(shape)


def _crlb_x_px(
    n_ph: np.ndarray, bg: np.ndarray, sx: np.ndarray, sy: np.ndarray, window_px: int, read_var_e2: float = 0.0
) -> np.ndarray:
    """sqrt(CRLB_x) in pixels for a batch of emitters (see integrated_gaussian_crlb_nm)."""
    centre = np.full(n_ph.size, window_px / 2.0)  # centre of the central pixel
    start = np.zeros(n_ph.size)
    fx = _pixel_fractions(centre, sx, start, window_px)
    fy = _pixel_fractions(centre, sy, start, window_px)
    edges = np.arange(window_px + 1)[None, :] - centre[:, None]
    # d(fraction)/d(centre) = -(g(right edge) - g(left edge)), g the Gaussian density
    gx = np.exp(-(edges**2) / (2 * sx[:, None] ** 2)) / (_SQRT2PI * sx[:, None])
    gy = np.exp(-(edges**2) / (2 * sy[:, None] ** 2)) / (_SQRT2PI * sy[:, None])
    dfx = -(gx[:, 1:] - gx[:, :-1])
    dfy = -(gy[:, 1:] - gy[:, :-1])
    valid = n_ph > 0
    n_ph = np.where(valid, n_ph, 1.0)  # placeholder; those rows are set to inf below
    mu = n_ph[:, None, None] * fy[:, :, None] * fx[:, None, :] + bg[:, None, None]
    mu = np.maximum(mu, 1e-12)  # zero background and far tails: avoid 0/0
    grads = np.stack(
        [
            n_ph[:, None, None] * fy[:, :, None] * dfx[:, None, :],
            n_ph[:, None, None] * dfy[:, :, None] * fx[:, None, :],
            fy[:, :, None] * fx[:, None, :],
            np.ones_like(mu),
        ],
        axis=1,
    ).reshape(n_ph.size, 4, -1)
    fisher = np.einsum("nik,njk->nij", grads / (mu.reshape(n_ph.size, 1, -1) + read_var_e2), grads)
    crlb = np.linalg.pinv(fisher, hermitian=True)[:, 0, 0]
    return np.where(valid, np.sqrt(np.maximum(crlb, 0.0)), np.inf)
