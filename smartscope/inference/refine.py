"""Maximum-likelihood refinement of the network's positions (Smith et al. 2010).

The network detects emitters and estimates z, photons and position well, but
a small CPU network does not reach the Cramér–Rao bound on its own. Around
each isolated detection, a few Newton–Raphson steps of the Poisson likelihood
of an integrated Gaussian — with σx, σy fixed by the network's z through the
astigmatic calibration in the model card — bring the lateral error to the
bound. Detections with a neighbour inside the fitting window keep the
network's estimate (a single-emitter fit would be biased there), and so does
any fit that does not converge to a plausible place.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import erf

_SQRT2 = np.sqrt(2.0)


def astigmatic_sigmas_px(z_nm: np.ndarray, astig: dict, pixel_size_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """σx, σy (px) at z from the card's calibration (Huang et al. 2008 model)."""
    s0, c, d = astig["sigma0_nm"], astig["focal_offset_nm"], astig["depth_nm"]
    sx = s0 * np.sqrt(1 + ((z_nm - c) / d) ** 2)
    sy = s0 * np.sqrt(1 + ((z_nm + c) / d) ** 2)
    return sx / pixel_size_nm, sy / pixel_size_nm


def _axis(u: np.ndarray, centre: np.ndarray, sigma: np.ndarray):
    """Pixel-integrated 1D Gaussian, its first and second derivative w.r.t. the centre."""
    a = (u - centre) / (_SQRT2 * sigma)
    b = (u + 1 - centre) / (_SQRT2 * sigma)
    e = 0.5 * (erf(b) - erf(a))
    ga, gb = np.exp(-(a**2)), np.exp(-(b**2))
    norm = 1 / (np.sqrt(2 * np.pi) * sigma)
    de = norm * (ga - gb)
    d2e = norm / sigma**2 * ((u - centre) * ga - (u + 1 - centre) * gb)
    return e, de, d2e


def refine_positions(photons_img: np.ndarray, locs: np.ndarray, *, qe: float, pixel_size_nm: float, astig: dict,
                     background: np.ndarray | float, window_px: int = 7, iterations: int = 10,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """locs (N, ≥4: x_nm, y_nm, z_nm, photons, ...) → (a copy with refined x, y, photons
    and, where locs has the 7th column, background; the mask of the rows refined).

    photons_img: (H, W) photons (ADU converted), as the network saw it;
    background: photons/px, per localization or one for all (the fit's start).
    """
    out = np.array(locs, dtype=np.float64, copy=True)
    refined = np.zeros(len(out), bool)
    if len(out) == 0:
        return out, refined
    half = window_px // 2
    x0, y0 = out[:, 0] / pixel_size_nm, out[:, 1] / pixel_size_nm
    if len(out) > 1:
        nn, _ = cKDTree(np.column_stack([x0, y0])).query(np.column_stack([x0, y0]), k=2)
        isolated = nn[:, 1] > window_px
    else:
        isolated = np.ones(1, bool)
    h, w = photons_img.shape
    cx, cy = np.floor(x0).astype(int), np.floor(y0).astype(int)
    inside = isolated & (cx - half >= 0) & (cy - half >= 0) & (cx + half < w) & (cy + half < h)
    idx = np.flatnonzero(inside)
    if idx.size == 0:
        return out, refined
    # ROIs (n, win, win) in photoelectrons: the Poisson variable
    offs = np.arange(-half, half + 1)
    rows = cy[idx, None, None] + offs[None, :, None]
    cols = cx[idx, None, None] + offs[None, None, :]
    data = np.clip(photons_img[rows, cols] * qe, 0, None)
    u = cols.astype(np.float64)  # pixel k spans [k, k+1)
    v = rows.astype(np.float64)
    sx, sy = astigmatic_sigmas_px(out[idx, 2], astig, pixel_size_nm)
    sx, sy = sx[:, None, None], sy[:, None, None]
    x, y = x0[idx, None, None].copy(), y0[idx, None, None].copy()
    n = np.maximum(out[idx, 3] * qe, 1.0)[:, None, None]
    b = np.maximum(np.broadcast_to(np.asarray(background, np.float64), len(out))[idx] * qe, 0.1)[:, None, None]
    for _ in range(iterations):
        ex, dex, d2ex = _axis(u, x, sx)
        ey, dey, d2ey = _axis(v, y, sy)
        mu = np.maximum(b + n * ex * ey, 1e-6)
        ratio = data / mu - 1
        w2 = data / mu**2
        updates = []
        for d1, d2 in ((n * dex * ey, n * d2ex * ey), (n * ex * dey, n * ex * d2ey), (ex * ey, 0.0), (1.0, 0.0)):
            num = np.sum(d1 * ratio, axis=(1, 2), keepdims=True)
            den = np.sum(d2 * ratio - d1**2 * w2, axis=(1, 2), keepdims=True)
            updates.append(np.where(den < 0, -num / np.where(den < 0, den, -1.0), 0.0))
        x = x + np.clip(updates[0], -0.5, 0.5)
        y = y + np.clip(updates[1], -0.5, 0.5)
        n = np.maximum(n + updates[2], 1.0)
        b = np.maximum(b + updates[3], 0.01)
    x, y, n, b = x[:, 0, 0], y[:, 0, 0], n[:, 0, 0], b[:, 0, 0]
    ok = np.isfinite(x) & np.isfinite(y) & (np.hypot(x - x0[idx], y - y0[idx]) < 1.0)
    keep = idx[ok]
    out[keep, 0] = x[ok] * pixel_size_nm
    out[keep, 1] = y[ok] * pixel_size_nm
    out[keep, 3] = n[ok] / qe
    if out.shape[1] > 6:
        out[keep, 6] = b[ok] / qe
    refined[keep] = True
    return out, refined
