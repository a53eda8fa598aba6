"""Lateral drift from the localizations themselves: redundant cross-correlation (RCC).

As Picasso's RCC (Wang et al. 2014, Opt. Express 22:15982): the frames are cut
into segments of `segment_frames`, each segment's localizations rendered
(a 2-D histogram at `pixel_nm`, lightly blurred), and every pair of segments
cross-correlated (FFT). Each pair's peak, refined to sub-pixel by a parabola
through its neighbours, measures the difference of the two segments' drifts:
n(n-1)/2 equations for n-1 unknowns, solved by least squares, the pairs that
disagree with the solution by more than `max_residual_nm` dropped and the
rest solved again. The segment drifts, at the segments' mean frames, are
interpolated to every frame (cubic spline, held flat past the ends).

`drift_cross_correlation` is the plain baseline: each segment against the
first alone (no redundancy).

Drift here is where the sample appears, relative to frame 0: a localization
in frame t is at true position + drift(t), so `apply_drift` subtracts it.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.interpolate import make_interp_spline
from scipy.ndimage import gaussian_filter

from smartscope.analysis.table import X, Y, write_csv


class DriftSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    segment_frames: int = Field(1000, ge=1, description="frames per sub-rendering (Picasso's default 1000)")
    pixel_nm: float = Field(20.0, gt=0, description="pixel of the sub-renderings")
    blur_px: float = Field(1.0, ge=0, description="Gaussian blur of the sub-renderings (pixels)")
    max_drift_nm: float = Field(1000.0, gt=0, description="largest drift between two segments searched for")
    max_residual_nm: float = Field(20.0, gt=0, description="RCC: pairs farther than this from the solution "
                                                            "are dropped")


class DriftError(ValueError):
    """Too few localizations or frames to estimate drift, and what to do about it."""


def segment_bounds(n_frames: int, segment_frames: int) -> list[tuple[int, int]]:
    """[start, stop) of each segment; a last segment shorter than half is joined to the one before."""
    starts = list(range(0, n_frames, segment_frames))
    bounds = [(s, min(s + segment_frames, n_frames)) for s in starts]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < segment_frames / 2:
        bounds[-2:] = [(bounds[-2][0], bounds[-1][1])]
    return bounds


def _renderings(table: dict[str, np.ndarray], bounds: list[tuple[int, int]], s: DriftSettings
                ) -> tuple[list[np.ndarray], int]:
    """The FFTs of each segment's rendering (zero-padded by the search range) and the padding (px)."""
    x, y, frame = table[X], table[Y], table["frame"]
    pad = int(np.ceil(s.max_drift_nm / s.pixel_nm)) + 2
    x0, y0 = x.min() - s.pixel_nm, y.min() - s.pixel_nm
    nx = int(np.ceil((x.max() - x0) / s.pixel_nm)) + 2
    ny = int(np.ceil((y.max() - y0) / s.pixel_nm)) + 2
    shape = (ny + pad, nx + pad)
    ffts = []
    for start, stop in bounds:
        m = (frame >= start) & (frame < stop)
        img = np.zeros(shape)
        np.add.at(img, (((y[m] - y0) / s.pixel_nm).astype(int), ((x[m] - x0) / s.pixel_nm).astype(int)), 1.0)
        if s.blur_px:
            img = gaussian_filter(img, s.blur_px)
        ffts.append(np.fft.rfft2(img - img.mean()))
    return ffts, pad


def _shift_nm(fa: np.ndarray, fb: np.ndarray, shape: tuple[int, int], pad: int, pixel_nm: float) -> np.ndarray:
    """(dx, dy) in nm of rendering b relative to a: the peak of their cross-correlation, sub-pixel."""
    cc = np.fft.irfft2(fb * np.conj(fa), s=shape)
    cc = np.fft.fftshift(cc)
    cy, cx = shape[0] // 2, shape[1] // 2
    win = cc[cy - pad:cy + pad + 1, cx - pad:cx + pad + 1]
    iy, ix = np.unravel_index(np.argmax(win), win.shape)
    iy, ix = min(max(iy, 1), win.shape[0] - 2), min(max(ix, 1), win.shape[1] - 2)

    def vertex(m1: float, c: float, p1: float) -> float:
        denom = m1 - 2 * c + p1
        return 0.5 * (m1 - p1) / denom if denom < 0 else 0.0

    dy = iy - pad + vertex(win[iy - 1, ix], win[iy, ix], win[iy + 1, ix])
    dx = ix - pad + vertex(win[iy, ix - 1], win[iy, ix], win[iy, ix + 1])
    return np.array([dx, dy]) * pixel_nm


def _check(table: dict[str, np.ndarray], bounds: list[tuple[int, int]]) -> None:
    if len(bounds) < 2:
        raise DriftError(f"{bounds[-1][1]} frames make one segment: drift needs at least two (lower "
                         "--segment-frames)")
    counts = [np.count_nonzero((table["frame"] >= a) & (table["frame"] < b)) for a, b in bounds]
    if min(counts) < 10:
        raise DriftError(f"a segment of frames {bounds[int(np.argmin(counts))]} has {min(counts)} localizations: "
                         "too few to correlate (raise --segment-frames)")


def _per_frame(centres: np.ndarray, drift_nm: np.ndarray, n_frames: int) -> np.ndarray:
    """Segment drifts at their centres → (n_frames, 2), cubic spline inside, flat outside."""
    frames = np.clip(np.arange(n_frames), centres[0], centres[-1])
    k = min(3, len(centres) - 1)
    return make_interp_spline(centres, drift_nm, k=k)(frames)


def _segment_renderings(table: dict[str, np.ndarray], n_frames: int, s: DriftSettings):
    """(segment bounds, their renderings' FFTs, padding, rendering shape) for the correlations."""
    bounds = segment_bounds(n_frames, s.segment_frames)
    _check(table, bounds)
    ffts, pad = _renderings(table, bounds, s)
    return bounds, ffts, pad, (ffts[0].shape[0], (ffts[0].shape[1] - 1) * 2)


def estimate_drift(table: dict[str, np.ndarray], n_frames: int, settings: DriftSettings | None = None,
                   ) -> np.ndarray:
    """RCC drift (n_frames, 2) [x_nm, y_nm] per frame, relative to frame 0."""
    s = settings or DriftSettings()
    bounds, ffts, pad, shape = _segment_renderings(table, n_frames, s)
    n = len(bounds)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    shifts = np.array([_shift_nm(ffts[i], ffts[j], shape, pad, s.pixel_nm) for i, j in pairs])
    a = np.zeros((len(pairs), n - 1))  # unknowns: drift of segments 1..n-1 (segment 0 is the reference)
    for row, (i, j) in enumerate(pairs):
        if j:
            a[row, j - 1] = 1.0
        if i:
            a[row, i - 1] = -1.0
    solution = np.linalg.lstsq(a, shifts, rcond=None)[0]
    residual = np.linalg.norm(a @ solution - shifts, axis=1)
    good = residual <= s.max_residual_nm
    if not good.all() and np.linalg.matrix_rank(a[good]) == n - 1:
        solution = np.linalg.lstsq(a[good], shifts[good], rcond=None)[0]
    segment_drift = np.vstack([[0.0, 0.0], solution])
    return _reference_to_frame_zero(_per_frame(_centres(bounds), segment_drift, n_frames))


def drift_cross_correlation(table: dict[str, np.ndarray], n_frames: int, settings: DriftSettings | None = None,
                            ) -> np.ndarray:
    """The baseline: each segment correlated with the first only; (n_frames, 2) like `estimate_drift`."""
    s = settings or DriftSettings()
    bounds, ffts, pad, shape = _segment_renderings(table, n_frames, s)
    segment_drift = np.array([_shift_nm(ffts[0], f, shape, pad, s.pixel_nm) for f in ffts])
    return _reference_to_frame_zero(_per_frame(_centres(bounds), segment_drift, n_frames))


def _centres(bounds: list[tuple[int, int]]) -> np.ndarray:
    return np.array([0.5 * (a + b - 1) for a, b in bounds])


def _reference_to_frame_zero(drift_nm: np.ndarray) -> np.ndarray:
    return drift_nm - drift_nm[0]


def apply_drift(table: dict[str, np.ndarray], drift_nm: np.ndarray) -> dict[str, np.ndarray]:
    """The table with each localization moved back by its frame's drift."""
    out = dict(table)
    out[X] = table[X] - drift_nm[table["frame"], 0]
    out[Y] = table[Y] - drift_nm[table["frame"], 1]
    return out


def drift_rms_error_nm(estimate_nm: np.ndarray, truth_nm: np.ndarray) -> float:
    """RMS distance between two drift curves (n_frames, 2), after removing their mean difference
    (a constant offset is no drift: no method can see it)."""
    diff = estimate_nm - truth_nm
    diff = diff - diff.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(diff**2, axis=1))))


def write_drift_csv(path, drift_nm: np.ndarray) -> None:
    """The drift curve as CSV: frame, x [nm], y [nm]."""
    write_csv(path, ("frame", "x [nm]", "y [nm]"),
              ((f, f"{dx:.2f}", f"{dy:.2f}") for f, (dx, dy) in enumerate(drift_nm.tolist())))
