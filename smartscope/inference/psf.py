"""A PSF calibrated from a bead z-stack, for the maximum-likelihood refinement of any PSF shape.

A lab images sparse fluorescent beads while stepping the focus, and averages
them into a model of its own PSF (as SMAP's and Li et al. 2018's cubic-spline
PSFs do): that model, not a Gaussian, is what the refinement
(`inference/refine.py`) then fits, so a PSF with rings, aberrations or a
shape that changes with z is fitted at its own bound.

The model is the pixel-integrated PSF — the fraction of an emitter's photons
that a camera pixel collects — on a grid of the offset between the pixel's
centre and the emitter (`oversample` nodes per pixel) and of z (the stack's
steps), interpolated by cubic splines. Every pixel of every bead at every
step is one sample of it, at the offset set by the bead's sub-pixel
position, so beads at many sub-pixel positions fill the grid without any
deconvolution (per step, the grid is the least-squares fit to the samples).
A bead's position is the Gaussian-weighted centroid of its sum over z: the
centre of a centrosymmetric PSF, to ~0.1 nm at 1e5 photons per step
(refitting the beads with the model itself did not improve on it). Photons
are normalised per bead and step to the crop (`crop_px` square): a fitted
photon count is the light within that square.

Saved as a small .npz: `smartscope calibrate psf BEADS.tif --z-step-nm 25
--out psf.npz`; `localize_frame(..., psf_calibration=path)`, or a model
card's `psf_calibration` entry, makes the refinement use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.ndimage import gaussian_filter, map_coordinates, maximum_filter, spline_filter
from scipy.sparse.linalg import factorized
from scipy.spatial import cKDTree

_DIFF_PX = 0.02  # central-difference step of the position derivatives (px)
_DIFF_Z_NM = 2.0
_CENTROID_SIGMA_PX = 1.5  # of the weighted centroid that finds the beads
_CENTROID_ITERATIONS = 30
_CURVATURE_PENALTY = 0.05  # of the grid fit, relative to the samples per node


@dataclass(frozen=True, eq=False)
class CalibratedPSF:
    """grid (nz, n, n): fraction of the photons in a pixel whose centre is at offset
    ((i - c) / oversample, (j - c) / oversample) px from the emitter (c = (n - 1) / 2), at z_nm[k]."""

    grid: np.ndarray
    z_nm: np.ndarray
    oversample: int
    pixel_size_nm: float
    beads: int = 0

    free_z = True  # the refinement fits z with this model

    @property
    def z_range_nm(self) -> tuple[float, float]:
        return float(self.z_nm[0]), float(self.z_nm[-1])

    @property
    def reach_px(self) -> float:
        """How far from the emitter the beads' crops sampled the model (px); beyond it, the grid is filled."""
        return (self.grid.shape[-1] - 1) / (2 * self.oversample) - 1

    @cached_property
    def _coefficients(self) -> np.ndarray:
        """Cubic B-spline coefficients of the grid (computed once; map_coordinates then skips its prefilter)."""
        return spline_filter(self.grid.astype(np.float64), order=3, mode="mirror")

    def at_pixel_size(self, pixel_size_nm: float) -> CalibratedPSF:
        """Itself, if calibrated for this pixel size (a PSF sampled by other pixels is another model)."""
        if not np.isclose(pixel_size_nm, self.pixel_size_nm, rtol=1e-3):
            raise ValueError(f"PSF calibrated at {self.pixel_size_nm:g} nm pixels, frames have {pixel_size_nm:g} nm")
        return self

    def fractions(self, ox_px: np.ndarray, oy_px: np.ndarray, z_nm: np.ndarray) -> np.ndarray:
        """The model at pixel-centre offsets from the emitter (px) and z (nm), broadcast together."""
        ox, oy, z = np.broadcast_arrays(ox_px, oy_px, z_nm)
        c = (self.grid.shape[-1] - 1) / 2
        top = self.grid.shape[-1] - 1
        dz = self.z_nm[1] - self.z_nm[0]
        coords = np.stack([np.clip((z - self.z_nm[0]) / dz, 0, len(self.z_nm) - 1),
                           np.clip(oy * self.oversample + c, 0, top), np.clip(ox * self.oversample + c, 0, top)])
        return map_coordinates(self._coefficients, coords.reshape(3, -1), order=3, prefilter=False,
                               mode="mirror").reshape(ox.shape)

    def __call__(self, u, v, x, y, z, derivatives: bool = True):
        """As the refinement asks: pixels [u, u+1) × [v, v+1), emitter at x, y (px), z (nm) →
        the fractions and, with `derivatives`, their derivatives w.r.t. x, y (per px) and z (per nm)."""
        ox, oy = u + 0.5 - x, v + 0.5 - y
        if not derivatives:
            return (self.fractions(ox, oy, z),)
        h, hz = _DIFF_PX, _DIFF_Z_NM
        ox, oy, z = np.broadcast_arrays(ox, oy, z)
        # the value and the six points of the central differences in one call (one spline pass, not seven)
        f, fxm, fxp, fym, fyp, fzp, fzm = self.fractions(np.stack([ox, ox - h, ox + h, ox, ox, ox, ox]),
                                                         np.stack([oy, oy, oy, oy - h, oy + h, oy, oy]),
                                                         np.stack([z, z, z, z, z, z + hz, z - hz]))
        return f, (fxm - fxp) / (2 * h), (fym - fyp) / (2 * h), (fzp - fzm) / (2 * hz)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, grid=self.grid.astype(np.float32), z_nm=self.z_nm, oversample=self.oversample,
                            pixel_size_nm=self.pixel_size_nm, beads=self.beads)


@lru_cache(maxsize=8)
def load_psf(path: str | Path) -> CalibratedPSF:
    """A calibration written by `CalibratedPSF.save` (cached: the refinement asks for it per frame)."""
    with np.load(path) as f:
        return CalibratedPSF(grid=f["grid"].astype(np.float64), z_nm=f["z_nm"].astype(np.float64),
                             oversample=int(f["oversample"]), pixel_size_nm=float(f["pixel_size_nm"]),
                             beads=int(f["beads"]))


def find_beads(stack_photons: np.ndarray, crop_px: int, min_photons: float) -> np.ndarray:
    """(K, 2) x, y (px) of the isolated beads of a z-stack: peaks of the background-free sum
    over z, each crop_px from any other and from the edges, each with ≥ min_photons per step."""
    background = np.median(stack_photons, axis=(1, 2), keepdims=True)
    total = np.sum(stack_photons - background, axis=0)
    smooth = gaussian_filter(total, 1.0)
    peaks = (smooth == maximum_filter(smooth, size=crop_px)) & (smooth > 0)
    iy, ix = np.nonzero(peaks)
    half = crop_px // 2
    h, w = total.shape
    inside = (ix >= half) & (iy >= half) & (ix < w - half) & (iy < h - half)
    ix, iy = ix[inside], iy[inside]
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    crops = total[iy[:, None, None] + yy[None], ix[:, None, None] + xx[None]]
    light = crops.sum(axis=(1, 2))
    ok = light >= min_photons * len(stack_photons)
    if ok.sum() > 1:
        nn, _ = cKDTree(np.column_stack([ix, iy])[ok]).query(np.column_stack([ix, iy])[ok], k=2)
        ok[np.flatnonzero(ok)[nn[:, 1] < crop_px]] = False
    crops = crops[ok]
    # a Gaussian-weighted centroid, the weight centred on the estimate until it stops moving: the centre
    # of any centrosymmetric PSF, unbiased by the crop's edges or the background (a plain centroid is
    # pulled towards the crop's centre by the light it cuts off)
    dx, dy = np.zeros(len(crops)), np.zeros(len(crops))
    for _ in range(_CENTROID_ITERATIONS):
        weight = crops * np.exp(-((xx[None] - dx[:, None, None]) ** 2 + (yy[None] - dy[:, None, None]) ** 2)
                                / (2 * _CENTROID_SIGMA_PX**2))
        light = weight.sum(axis=(1, 2))
        dx = np.clip(np.sum(weight * xx, axis=(1, 2)) / light, -half / 2, half / 2)
        dy = np.clip(np.sum(weight * yy, axis=(1, 2)) / light, -half / 2, half / 2)
    return np.column_stack([ix[ok] + 0.5 + dx, iy[ok] + 0.5 + dy])


def calibrate_beads(stack_photons: np.ndarray, z_nm: np.ndarray, pixel_size_nm: float, *, oversample: int = 4,
                    crop_px: int = 15, min_photons: float = 1000.0) -> CalibratedPSF:
    """A bead z-stack (nz, H, W) in photons at focus positions z_nm (uniform steps) → the PSF model."""
    stack = np.asarray(stack_photons, np.float64)
    z_nm = np.asarray(z_nm, np.float64)
    if stack.ndim != 3 or len(z_nm) != len(stack) or len(z_nm) < 4:
        raise ValueError("need a (z, y, x) stack of at least 4 steps and one z per step")
    if not np.allclose(np.diff(z_nm), z_nm[1] - z_nm[0], rtol=1e-3, atol=1e-3) or z_nm[1] <= z_nm[0]:
        raise ValueError("the z steps must be uniform and increasing")
    background = np.median(stack, axis=(1, 2))
    half = crop_px // 2
    h, w = stack.shape[1:]
    beads = find_beads(stack, crop_px, min_photons)
    ix, iy = np.floor(beads[:, 0]), np.floor(beads[:, 1])
    beads = beads[(ix >= half) & (iy >= half) & (ix < w - half) & (iy < h - half)]  # whole crops only
    if len(beads) < 3:
        raise ValueError(f"found {len(beads)} isolated beads (need ≥ 3; ≥ 50 give a smooth model)")
    return _average(stack, background, beads, z_nm, pixel_size_nm, oversample, np.arange(-half, half + 1))


def _crops(stack, beads, offs):
    """(K, nz, c, c) crops around each bead's pixel and their pixel-edge coordinates (K, 1, c, 1), (K, 1, 1, c)."""
    ix, iy = np.floor(beads[:, 0]).astype(int), np.floor(beads[:, 1]).astype(int)
    rows = iy[:, None] + offs[None, :]
    cols = ix[:, None] + offs[None, :]
    crops = stack[:, rows[:, :, None], cols[:, None, :]].transpose(1, 0, 2, 3)
    return crops, rows[:, None, :, None].astype(np.float64), cols[:, None, None, :].astype(np.float64)


def _average(stack, background, beads, z_nm, pixel_size_nm, oversample, offs) -> CalibratedPSF:
    """Every bead pixel, background-free and normalised per bead and step, is a sample of the model
    at its offset; per z step, the grid whose bilinear interpolation fits the samples best (least
    squares, with a light curvature penalty that fills nodes few samples reach). A local mean of the
    samples instead would be biased by where, around each node, the few beads happen to fall."""
    crops, rows, cols = _crops(stack, beads, offs)
    signal = crops - background[None, :, None, None]
    signal = signal / signal.sum(axis=(2, 3), keepdims=True)
    nz, half = len(z_nm), len(offs) // 2
    n = 2 * half * oversample + 1 + 2 * oversample  # offsets of ±(half + 1) px: the crop's reach
    c = (n - 1) / 2
    gx = np.broadcast_to((cols[:, 0] + 0.5 - beads[:, 0, None, None]) * oversample + c, signal[:, 0].shape).ravel()
    gy = np.broadcast_to((rows[:, 0] + 0.5 - beads[:, 1, None, None]) * oversample + c, signal[:, 0].shape).ravel()
    x0 = np.clip(np.floor(gx).astype(int), 0, n - 2)
    y0 = np.clip(np.floor(gy).astype(int), 0, n - 2)
    fx, fy = np.clip(gx - x0, 0, 1), np.clip(gy - y0, 0, 1)
    m = gx.size
    cols_ = np.concatenate([y0 * n + x0, y0 * n + x0 + 1, (y0 + 1) * n + x0, (y0 + 1) * n + x0 + 1])
    vals = np.concatenate([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    a = sparse.csr_matrix((vals, (np.tile(np.arange(m), 4), cols_)), shape=(m, n * n))
    d2 = sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))
    eye = sparse.identity(n)
    curvature = sparse.vstack([sparse.kron(eye, d2), sparse.kron(d2, eye)])
    normal = (a.T @ a + _CURVATURE_PENALTY * m / n**2 * (curvature.T @ curvature)).tocsc()
    solve = factorized(normal)
    samples = signal.transpose(1, 0, 2, 3).reshape(nz, m)
    grid = np.stack([solve(a.T @ samples[k]) for k in range(nz)]).reshape(nz, n, n)
    return CalibratedPSF(grid=grid, z_nm=z_nm, oversample=oversample, pixel_size_nm=pixel_size_nm, beads=len(beads))


def calibrate_stack(stack: Path, out: Path, *, z_step_nm: float, z_first_nm: float | None = None,
                    pixel_size_nm: float | None = None, adu_per_electron: float = 2.0, offset_adu: float = 100.0,
                    qe: float = 0.8, em_gain: float = 1.0) -> dict:
    """`smartscope calibrate psf BEADS.tif`: a bead z-stack file (ADU; one frame per focus step, z_first_nm
    first, default centred on 0) → the model saved at `out` (.npz); what it found."""
    from smartscope.inference.offline import StackError, _camera_params, open_stack
    from smartscope.simulation.camera import adu_to_photons

    frames, file_pixel_nm = open_stack(Path(stack))
    pixel_nm = pixel_size_nm or file_pixel_nm
    if pixel_nm is None:
        raise StackError(f"{stack}: no pixel size in the metadata; give --pixel-size-nm")
    camera = _camera_params(pixel_nm, adu_per_electron, offset_adu, qe, em_gain)
    first = -(len(frames) - 1) / 2 * z_step_nm if z_first_nm is None else z_first_nm
    z_nm = first + z_step_nm * np.arange(len(frames))
    try:
        psf = calibrate_beads(adu_to_photons(np.asarray(frames), camera), z_nm, pixel_nm)
    except ValueError as e:
        raise StackError(f"{stack}: {e}") from e
    psf.save(out)
    return {"out": str(out), "beads": psf.beads, "z_nm": [float(z_nm[0]), float(z_nm[-1])],
            "z_step_nm": z_step_nm, "pixel_size_nm": pixel_nm, "grid": list(psf.grid.shape)}
