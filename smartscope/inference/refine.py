"""Maximum-likelihood refinement of the network's positions (Smith et al. 2010; Huang et al. 2013).

The network detects emitters and estimates z, photons and position well, but
a small CPU network does not reach the Cramér–Rao bound on its own. Around
each isolated detection, a Levenberg–Marquardt fit of the likelihood of the
pixels brings the lateral error to the bound. The PSF is either

- the card's astigmatic calibration: a pixel-integrated Gaussian whose σx, σy
  are fixed by the network's z (x, y, photons, background fitted), or
- a calibrated PSF (`inference.psf.CalibratedPSF`, averaged from a bead
  z-stack): any shape, interpolated by cubic splines (x, y, photons,
  background and z fitted, z starting at the network's).

The likelihood is Poisson on photoelectrons; with `read_noise_e` (a sCMOS) it
is Huang et al.'s: data + σ² ~ Poisson(μ + σ²), which makes the Gaussian read
noise part of the model instead of a bias of the fit's weights. An EMCCD's
excess noise (variance ×2) is met by fitting half the counts (Mortensen 2010).
Detections with a neighbour nearer than ISOLATION_PX (one at least a fifth as
bright) keep the network's estimate (a single-emitter fit would be biased
there), and so does any fit that does not converge to a plausible place. Each refined row's uncertainty
is the bound at the fitted values (Fisher information of the same model).

With a calibrated PSF, `ring_ghosts` finds the detections that are only a
brighter emitter's rings (a real PSF's rings 4.5-6 px out drew about two
detections per bright emitter): a likelihood-ratio test at a fixed size
(GHOST_P_VALUE), not a tuned threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import erf
from scipy.stats import chi2

if TYPE_CHECKING:
    from smartscope.inference.psf import CalibratedPSF

_SQRT2 = np.sqrt(2.0)
_NEIGHBOUR_FRACTION = 0.2  # a neighbour this bright (relative) inside the window keeps the network's estimate
_CONVERGED_PX = 1e-3  # the fit stops once every emitter's last accepted position step is below this (0.1 nm)...
_GIVEN_UP_DAMPING = 1e5  # ... or its steps have failed so often that no step of any size is taken
WINDOW_PX = 9  # the fit's window (px): within 0.5 % of the whole-image bound at the in-focus width
ISOLATION_PX = 7.0  # no such neighbour nearer than this (px): its light barely reaches the window
GHOST_P_VALUE = 1e-3  # size of the ring-ghost test: a ghost is kept with this probability where the PSF is right
GHOST_SHIFT_PX = 1.0  # the tested emitter is at the detection: within a pixel of it, as a refined one must be
GHOST_WINDOW_PX = WINDOW_PX  # holds the tested detection's light (a smaller one lets the flat
# background take a dim, defocused emitter's light, and the test its power)


def astigmatic_sigmas_px(z_nm: np.ndarray, astig: dict, pixel_size_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """σx, σy (px) at z from the card's calibration (Huang et al. 2008 model)."""
    s0, c, d = astig["sigma0_nm"], astig["focal_offset_nm"], astig["depth_nm"]
    sx = s0 * np.sqrt(1 + ((z_nm - c) / d) ** 2)
    sy = s0 * np.sqrt(1 + ((z_nm + c) / d) ** 2)
    return sx / pixel_size_nm, sy / pixel_size_nm


def _axis(u: np.ndarray, centre: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-integrated 1D Gaussian over pixels [u, u+1) and its derivative w.r.t. the centre."""
    a = (u - centre) / (_SQRT2 * sigma)
    b = (u + 1 - centre) / (_SQRT2 * sigma)
    e = 0.5 * (erf(b) - erf(a))
    de = (np.exp(-(a**2)) - np.exp(-(b**2))) / (np.sqrt(2 * np.pi) * sigma)
    return e, de


class _Gaussian:
    """The card's astigmatic PSF at a fixed z: fractions of photons per pixel and their x, y derivatives."""

    free_z = False

    def __init__(self, astig: dict, pixel_size_nm: float):
        self.astig, self.pixel_size_nm = astig, pixel_size_nm

    def __call__(self, u, v, x, y, z, derivatives: bool = True):
        sx, sy = astigmatic_sigmas_px(z, self.astig, self.pixel_size_nm)
        ex, dex = _axis(u, x, sx)
        ey, dey = _axis(v, y, sy)
        return (ex * ey, dex * ey, ex * dey) if derivatives else (ex * ey,)


def refine_positions(photons_img: np.ndarray, locs: np.ndarray, *, qe: float, pixel_size_nm: float, astig: dict,
                     background: np.ndarray | float, window_px: int = WINDOW_PX, iterations: int = 20,
                     read_noise_e: float = 0.0, em_gain: float = 1.0, psf: CalibratedPSF | None = None,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """locs (N, ≥4: x_nm, y_nm, z_nm, photons, ...) → (a copy with refined x, y, photons, with a
    calibrated `psf` also z, and where locs has the columns, the fit's precision (5th, nm) and
    background (7th); the mask of the rows refined).

    photons_img: (H, W) photons (ADU converted), as the network saw it;
    background: photons/px, per localization or one for all (the fit's start).
    The window is WINDOW_PX wide.
    """
    out = np.array(locs, dtype=np.float64, copy=True)
    refined = np.zeros(len(out), bool)
    if len(out) == 0:
        return out, refined
    half = window_px // 2
    x0, y0 = out[:, 0] / pixel_size_nm, out[:, 1] / pixel_size_nm
    psf_at = None if psf is None else psf.at_pixel_size(pixel_size_nm)
    isolated = _isolated(x0, y0, out[:, 3], ISOLATION_PX)
    h, w = photons_img.shape
    cx, cy = np.floor(x0).astype(int), np.floor(y0).astype(int)
    inside = isolated & (cx - half >= 0) & (cy - half >= 0) & (cx + half < w) & (cy + half < h)
    idx = np.flatnonzero(inside & np.isfinite(out[:, 2]))
    if idx.size == 0:
        return out, refined
    excess, var_read = _camera_counts(read_noise_e, em_gain)
    data, weight, u, v = _windows(photons_img, cx[idx], cy[idx], half, qe / excess, var_read)
    bg = np.broadcast_to(np.asarray(background, np.float64), len(out))[idx]
    z = out[idx, 2].copy()
    if psf_at is None:
        model = _Gaussian(astig, pixel_size_nm)
    else:
        model = psf_at
        z = np.clip(z, *model.z_range_nm)
    # the background's start: the network's, unless it is below half what the window's rim shows (on a PSF
    # it never saw, the network can put the background at 0, and a fit started there rarely converges)
    rim = np.concatenate([data[:, [0, -1], :].reshape(len(idx), -1), data[:, 1:-1, [0, -1]].reshape(len(idx), -1)],
                         axis=1)
    rim_bg = np.maximum(np.median(rim, axis=1) - var_read, 0.01)
    bg_start = bg * qe / excess
    bg_start = np.where(bg_start < 0.5 * rim_bg, rim_bg, np.maximum(bg_start, 0.01))
    theta = np.column_stack([x0[idx], y0[idx], np.maximum(out[idx, 3] * qe / excess, 1.0), bg_start,
                             z])[:, : 5 if model.free_z else 4]
    theta, fisher, converged, _ = _levenberg_marquardt(model, theta, data, weight, u, v, var_read, z, iterations)
    x, y = theta[:, 0], theta[:, 1]
    ok = converged & np.all(np.isfinite(theta), axis=1) & (np.hypot(x - x0[idx], y - y0[idx]) < 1.0)
    keep = idx[ok]
    out[keep, 0] = x[ok] * pixel_size_nm
    out[keep, 1] = y[ok] * pixel_size_nm
    out[keep, 3] = theta[ok, 2] * excess / qe
    if model.free_z:
        out[keep, 2] = theta[ok, 4]
    if out.shape[1] > 4:
        cov = np.linalg.pinv(fisher[ok], hermitian=True)
        out[keep, 4] = np.sqrt(np.maximum((cov[:, 0, 0] + cov[:, 1, 1]) / 2, 0)) * pixel_size_nm
    if out.shape[1] > 6:
        out[keep, 6] = theta[ok, 3] * excess / qe
    refined[keep] = True
    return out, refined


def _camera_counts(read_noise_e: float, em_gain: float) -> tuple[float, float]:
    """The EMCCD excess factor (counts are divided by it) and the read-noise variance in those counts."""
    excess = 2.0 if em_gain > 1 else 1.0
    return excess, (read_noise_e / em_gain / excess) ** 2  # read noise comes after the EM gain


def _windows(photons_img: np.ndarray, cx: np.ndarray, cy: np.ndarray, half: int, scale: float, var_read: float,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(2 half + 1)² windows centred on pixels (cx, cy) → the counts the likelihood is Poisson in
    (photoelectrons, /2 on an EMCCD, + the read-noise variance), their weights (0: saturated or missing
    pixels carry no information) and the pixels' left and top edges u, v (pixel k spans [k, k+1))."""
    offs = np.arange(-half, half + 1)
    rows = cy[:, None, None] + offs[None, :, None]
    cols = cx[:, None, None] + offs[None, None, :]
    data = photons_img[rows, cols] * scale
    bad = ~np.isfinite(data)
    data = np.where(bad, 0.0, np.clip(data + var_read, 0, None))
    return data, (~bad).astype(np.float64), cols.astype(np.float64), rows.astype(np.float64)


def ring_ghosts(photons_img: np.ndarray, locs: np.ndarray, fitted: np.ndarray, psf: CalibratedPSF, *, qe: float,
                pixel_size_nm: float, read_noise_e: float = 0.0, em_gain: float = 1.0, window_px: int = GHOST_WINDOW_PX,
                p_value: float = GHOST_P_VALUE, iterations: int = 20) -> np.ndarray:
    """Which detections are light of a brighter one's calibrated PSF (its rings), not emitters: a
    likelihood-ratio test per detection with a brighter, `fitted` one (refined with that PSF: no
    neighbour a fifth as bright, so the tested one is dimmer than that) within the PSF's extent.

    Around the dimmer detection (`window_px` square), the light every such brighter detection puts
    there by the calibrated PSF (at its fitted x, y, z, photons) is known; H0 adds only a
    flat background to it, H1 one more emitter (x, y, photons, z free, started at the detection's). The
    detection is a ghost unless 2 Δlog L exceeds the χ² quantile of H1's extra parameters at `p_value`
    (Wilks). Two passes: the second leaves the first's ghosts out of the known light.
    locs (N, ≥4: x_nm, y_nm, z_nm, photons, ...) → the (N,) mask of ghosts."""
    ghost = np.zeros(len(locs), bool)
    model = psf.at_pixel_size(pixel_size_nm)
    x, y = locs[:, 0] / pixel_size_nm, locs[:, 1] / pixel_size_nm
    z, nph = np.clip(locs[:, 2], *model.z_range_nm), locs[:, 3]
    usable = np.isfinite(x) & np.isfinite(y) & np.isfinite(z) & np.isfinite(nph)
    pairs = cKDTree(np.column_stack([np.where(usable, x, -1e9), np.where(usable, y, -1e9)])).query_pairs(
        model.reach_px, output_type="ndarray") if len(locs) > 1 else np.zeros((0, 2), int)
    pairs = pairs[usable[pairs].all(axis=1) & (nph[pairs[:, 0]] != nph[pairs[:, 1]])] if len(pairs) else pairs
    first_dimmer = nph[pairs[:, 0]] < nph[pairs[:, 1]]
    dim = np.where(first_dimmer, pairs[:, 0], pairs[:, 1])
    bright = np.where(first_dimmer, pairs[:, 1], pairs[:, 0])
    dim, bright = dim[fitted[bright]], bright[fitted[bright]]  # the light of a fitted one only is known
    # ... and not where its fit's window held the tested one's light: there the fit took it for its own
    seen = np.hypot(x[dim] - x[bright], y[dim] - y[bright]) <= WINDOW_PX / 2
    clear = ~np.isin(dim, dim[seen])
    dim, bright = dim[clear], bright[clear]
    half = window_px // 2
    h, w = photons_img.shape
    cx, cy = np.floor(x).astype(int), np.floor(y).astype(int)
    inside = (cx - half >= 0) & (cy - half >= 0) & (cx + half < w) & (cy + half < h)
    dim, bright = dim[inside[dim]], bright[inside[dim]]
    cand = np.unique(dim)
    if cand.size == 0:
        return ghost
    excess, var_read = _camera_counts(read_noise_e, em_gain)
    scale = qe / excess
    data, weight, u, v = _windows(photons_img, cx[cand], cy[cand], half, scale, var_read)
    slot = np.searchsorted(cand, dim)  # each pair's candidate window
    # the brighter ones' light in each pair's window (none beyond the calibration's extent)
    ox, oy = u[slot] + 0.5 - x[bright, None, None], v[slot] + 0.5 - y[bright, None, None]
    light = model.fractions(ox, oy, z[bright, None, None]) * (nph[bright, None, None] * scale)
    light = np.where((np.abs(ox) <= model.reach_px) & (np.abs(oy) <= model.reach_px), np.maximum(light, 0), 0)
    threshold = chi2.isf(p_value, 4 if model.free_z else 3)
    for _ in range(2):
        known = np.zeros_like(data)
        np.add.at(known, slot[~ghost[bright]], light[~ghost[bright]])
        fixed = known + var_read
        # H0: the known light and a flat background (its MLE by Fisher scoring: concave in one parameter)
        b = np.maximum(np.median((data - fixed).reshape(len(cand), -1), axis=1), 0.01)
        for _ in range(30):
            mu = np.maximum(b[:, None, None] + fixed, 1e-9)
            step = np.sum(weight * (data / mu - 1), axis=(1, 2)) / np.maximum(np.sum(weight / mu, axis=(1, 2)), 1e-12)
            b = np.maximum(b + step, 0.0)
        mu = np.maximum(b[:, None, None] + fixed, 1e-9)
        loglik0 = np.sum(weight * (data * np.log(mu) - mu), axis=(1, 2))
        # H1: one more emitter at the detection
        theta = np.column_stack([x[cand], y[cand], np.maximum(nph[cand] * scale, 1.0), np.maximum(b, 0.01),
                                 z[cand]])[:, : 5 if model.free_z else 4]
        at = theta[:, :2].copy()
        _, _, _, loglik1 = _levenberg_marquardt(model, theta, data, weight, u, v, fixed, z[cand].copy(), iterations,
                                                bounds=(at - GHOST_SHIFT_PX, at + GHOST_SHIFT_PX))
        ghost = np.zeros(len(locs), bool)
        ghost[cand] = ~(2 * (loglik1 - loglik0) > threshold)
    return ghost


def _isolated(x_px: np.ndarray, y_px: np.ndarray, photons: np.ndarray, distance_px: float) -> np.ndarray:
    """Which detections have no neighbour within distance_px at least _NEIGHBOUR_FRACTION as bright.

    A much dimmer neighbour does not stop the fit: the little of its light that reaches the window
    biases the fit less than the network's own error, and on a PSF with rings that the network never
    saw, such a 'neighbour' is often a ring of the emitter itself. The dimmer one is never fitted."""
    isolated = np.ones(len(x_px), bool)
    pairs = cKDTree(np.column_stack([x_px, y_px])).query_pairs(distance_px, output_type="ndarray")
    if len(pairs) == 0:
        return isolated
    a, b = photons[pairs[:, 0]], photons[pairs[:, 1]]
    isolated[pairs[:, 0][b >= _NEIGHBOUR_FRACTION * a]] = False
    isolated[pairs[:, 1][a >= _NEIGHBOUR_FRACTION * b]] = False
    return isolated


def _levenberg_marquardt(model, theta: np.ndarray, data: np.ndarray, weight: np.ndarray, u: np.ndarray,
                         v: np.ndarray, fixed: float | np.ndarray, z_fixed: np.ndarray, iterations: int,
                         bounds: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Poisson MLE of θ = (x, y, N, b[, z]) per emitter, vectorised: Fisher scoring steps, damped
    per emitter (Levenberg–Marquardt) and kept only where the likelihood rises. An emitter whose
    position has settled (or whose steps keep failing) leaves the iteration: most settle in 4–8 steps.
    `fixed`: known counts per pixel beside the emitter and background (the read-noise variance; one
    value, or per window (n, w, w): also other emitters' light); `bounds`: (n, 2) lowest and highest x, y.
    Returns θ, the Fisher information at θ (n, p, p), whether the last steps were tiny, and the
    log-likelihood at θ (Σ d log μ - μ, without the data's own constant)."""
    n, p = theta.shape

    def evaluate(rows, th, derivatives=True):
        x, y, nph, b = (th[:, i, None, None] for i in range(4))
        z = th[:, 4, None, None] if p > 4 else z_fixed[rows, None, None]
        w, d = weight[rows], data[rows]
        parts = model(u[rows], v[rows], x, y, z, derivatives)
        mu = np.maximum(nph * parts[0] + b + (fixed[rows] if np.ndim(fixed) else fixed), 1e-9)
        loglik = np.sum(w * (d * np.log(mu) - mu), axis=(1, 2))
        if not derivatives:
            return loglik
        jac = [nph * parts[1], nph * parts[2], parts[0], np.ones_like(mu)] + ([nph * parts[3]] if p > 4 else [])
        jac = np.stack([j * np.ones_like(mu) for j in jac], axis=1).reshape(len(th), p, -1)
        grad = np.einsum("npk,nk->np", jac, ((d - mu) * w / mu).reshape(len(th), -1))
        fisher = np.einsum("npk,nqk->npq", jac * (w / mu).reshape(len(th), 1, -1), jac)
        return loglik, grad, fisher

    loglik, grad, fisher = evaluate(slice(None), theta)
    damping = np.full(n, 1e-3)
    step_size = np.full(n, np.inf)
    lower = np.array([-np.inf, -np.inf, 1.0, 0.0, -np.inf][:p])
    active = np.arange(n)
    for _ in range(iterations):
        f = fisher[active]
        a = f + damping[active, None, None] * np.einsum("npp->np", f)[:, :, None] * np.eye(p)
        step = np.linalg.solve(a + 1e-12 * np.eye(p), grad[active, :, None])[:, :, 0]
        step[:, :2] = np.clip(step[:, :2], -1.0, 1.0)
        trial = np.maximum(theta[active] + step, lower)
        if bounds is not None:
            trial[:, :2] = np.clip(trial[:, :2], bounds[0][active], bounds[1][active])
        if p > 4:
            trial[:, 4] = np.clip(trial[:, 4], *model.z_range_nm)
        better = evaluate(active, trial, derivatives=False) >= loglik[active]
        theta[active] = np.where(better[:, None], trial, theta[active])
        step_size[active] = np.where(better, np.abs(step[:, :2]).max(axis=1), step_size[active])
        damping[active] = np.clip(np.where(better, damping[active] / 10, damping[active] * 10), 1e-7, 1e7)
        loglik[active], grad[active], fisher[active] = evaluate(active, theta[active])
        active = active[(step_size[active] >= _CONVERGED_PX) & (damping[active] < _GIVEN_UP_DAMPING)]
        if active.size == 0:
            break
    return theta, fisher, step_size < 0.01, loglik
