"""Localization: frames in photons → network maps → a table of emitters in nm.

The network (see models/localization.json) sees a causal window of frames
(t-2, t-1, t) and predicts per pixel of frame t: detection probability p, the
emitter's sub-pixel offset (dx, dy, in pixels from the pixel centre), its z
relative to the focal plane, its photon count, the local background, and the
standard error of each estimate. Peaks of p above the threshold that are
local maxima in 3×3 become localizations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.ndimage import maximum_filter

from smartscope.inference.psf import load_psf
from smartscope.inference.refine import refine_positions, ring_ghosts
from smartscope.inference.session import LoadedModel, fill_non_finite
from smartscope.simulation.camera import adu_to_photons


def normalise(photons: np.ndarray, norm: dict[str, Any], median_photons: float | None = None) -> np.ndarray:
    """Photons (..., H, W) → network input, as the model card prescribes.

    With `subtract_median`, each frame's median (its background, for sparse
    emitters) is removed first: a flat frame, however bright, becomes zeros and
    cannot produce detections. A tile of a larger frame (inference/tiling.py)
    is given the whole frame's median, so that its pixels are the whole frame's.
    """
    x = np.asarray(photons, dtype=np.float32)
    if norm.get("subtract_median"):
        x = x - (np.median(x, axis=(-2, -1), keepdims=True) if median_photons is None
                 else np.float32(median_photons))
    return x / np.float32(norm["input_scale_photons"])


def causal_window(photons: np.ndarray, frames: int) -> np.ndarray:
    """(H, W) or (T, H, W) photons, oldest first → (frames, H, W) ending at the last frame.

    Missing earlier frames (the start of a run, or frames another worker took)
    are copies of the oldest one there is: the model was trained on such windows.
    """
    stack = np.asarray(photons, dtype=np.float32)
    stack = stack[None] if stack.ndim == 2 else stack[-frames:]
    return np.concatenate([np.repeat(stack[:1], frames - len(stack), axis=0), stack])


def prepare_frame(photons: np.ndarray, card: dict[str, Any], *, fill_photons: float | None = None,
                  median_photons: float | None = None) -> np.ndarray:
    """(H, W) photons → (H', W') network input, padded to the network stride.

    Non-finite pixels (NaN in float stacks) are replaced by the frame's median
    so they cannot create detections; padding repeats the edge. The worker
    prepares each frame once and keeps it for the windows of the next frames.
    A tile of a larger frame passes the whole frame's statistics
    (inference/tiling.py `frame_statistics`): the fill value and the median.
    """
    if fill_photons is None:
        img = fill_non_finite(photons)
    else:
        img = np.array(photons, dtype=np.float32)
        img[~np.isfinite(img)] = fill_photons
    return normalise(pad_to_stride(img, card), card["normalisation"], median_photons)


def pad_to_stride(img: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    """(H, W) → (H', W'), the next multiples of the card's `input_multiple_px`, repeating the last row / column."""
    multiple = int(card.get("input_multiple_px", 1))
    pad_h, pad_w = (-img.shape[0]) % multiple, (-img.shape[1]) % multiple
    if pad_h or pad_w:
        img = np.pad(img, ((0, pad_h), (0, pad_w)), mode="edge")
    return img


def window_input(prepared: list[np.ndarray], card: dict[str, Any]) -> np.ndarray:
    """Prepared frames (`prepare_frame`), oldest first, ending at the frame to localize →
    the model's (frames, H', W') input: the last `frames` of them, copies for the missing."""
    frames = int(card.get("frames", 1))
    return causal_window(np.stack(prepared[-frames:]), frames)


def prepare_input(photons: np.ndarray, card: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W) photons, or a (T, H, W) window ending at the frame to localize →
    (1, frames, H', W') float32 (see `prepare_frame`) and the frame's own (H, W)."""
    stack = np.asarray(photons)
    stack = stack[None] if stack.ndim == 2 else stack[-int(card.get("frames", 1)):]
    return window_input([prepare_frame(f, card) for f in stack], card)[None], stack.shape[-2:]


def decode_maps(maps: np.ndarray, shape: tuple[int, int], card: dict[str, Any], *,
                pixel_size_nm: float, threshold: float, background_photons: float) -> tuple[np.ndarray, np.ndarray]:
    """(1, C, H', W') network output → (N, 7) rows of LOCALIZATION_COLUMNS, and the flat index
    row * W + column of each row's peak pixel in `shape`.

    `background_photons` is the frame's median: the local background is that
    plus the network's bg map where it has one. The uncertainty is the network's
    own (sigma_x, sigma_y) where it predicts it, else Mortensen's formula.
    """
    norm = card["normalisation"]
    channels = card["outputs"][0]["channels"]
    h, w = shape
    m = {name: maps[0, i, :h, :w] for i, name in enumerate(channels)}
    p = m["p"]
    iy, ix = peak_pixels(p, threshold)
    x_nm = (ix + 0.5 + m["dx"][iy, ix]) * pixel_size_nm
    y_nm = (iy + 0.5 + m["dy"][iy, ix]) * pixel_size_nm
    z_nm = m["z"][iy, ix] * norm["z_scale_nm"]
    photons = np.maximum(m["photons"][iy, ix] * norm["photon_scale"], 1.0)
    background = background_photons + (m["bg"][iy, ix] * norm["input_scale_photons"] if "bg" in m else 0.0)
    background = np.maximum(background, 0.0) * np.ones_like(photons)
    if "sigma_x" in m:
        unc = np.sqrt((m["sigma_x"][iy, ix] ** 2 + m["sigma_y"][iy, ix] ** 2) / 2) * pixel_size_nm
    else:
        unc = mortensen_uncertainty_nm(photons, background, float(card["psf_sigma_nm"]), pixel_size_nm)
    locs = np.column_stack([x_nm, y_nm, z_nm, photons, unc, p[iy, ix], background]).astype(np.float64)
    return locs, iy * w + ix


def peak_pixels(p: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) detection probability → rows, columns of the detections, row-major: pixels at or above the
    threshold that are the maximum of their 3×3 neighbourhood (the order of `decode_maps`' rows)."""
    return np.nonzero((p >= threshold) & (p == maximum_filter(p, size=3, mode="constant")))


def mortensen_uncertainty_nm(photons: np.ndarray, background_per_px: np.ndarray | float,
                             sigma_nm: np.ndarray | float, pixel_size_nm: float) -> np.ndarray:
    """Lateral precision of an MLE fit (Mortensen et al. 2010, eq. 6)."""
    sa2 = sigma_nm**2 + pixel_size_nm**2 / 12
    b = np.maximum(background_per_px, 0.0)
    var = sa2 / photons * (16 / 9 + 8 * np.pi * sa2 * b / (photons * pixel_size_nm**2))
    return np.sqrt(var)


def frame_to_photons(frame_adu: np.ndarray, camera: Any) -> np.ndarray:
    """Raw frame (ADU) → photons per pixel; saturated pixels (at the integer
    type's maximum) carry no photon count and become NaN (masked downstream)."""
    photons = adu_to_photons(frame_adu, camera)
    if np.issubdtype(frame_adu.dtype, np.integer):
        photons[frame_adu >= np.iinfo(frame_adu.dtype).max] = np.nan
    return photons


def localize_photons(model: LoadedModel, photons: np.ndarray, camera: Any, *, threshold: float,
                     refine: bool = True, psf_calibration: str | None = None) -> tuple[np.ndarray, float]:
    """Photons (H, W), or a (T, H, W) window ending at it → (localizations, background photons/px)."""
    batch, shape = prepare_input(photons, model.card)
    return maps_to_localizations(model.card, model.run(batch), photons[-1] if np.ndim(photons) == 3 else photons,
                                 shape, camera, threshold=threshold, refine=refine, psf_calibration=psf_calibration)


def maps_to_localizations(card: dict[str, Any], maps: np.ndarray, photons: np.ndarray, shape: tuple[int, int],
                          camera: Any, *, threshold: float, refine: bool = True,
                          background_photons: float | None = None, psf_calibration: str | None = None,
                          ) -> tuple[np.ndarray, float]:
    """One frame's network maps (1, C, H', W') → (localizations, background photons/px): `localize_maps`."""
    locs, background, _ = localize_maps(card, maps, photons, shape, camera, threshold=threshold, refine=refine,
                                        background_photons=background_photons, psf_calibration=psf_calibration)
    return locs, background


def localize_maps(card: dict[str, Any], maps: np.ndarray, photons: np.ndarray, shape: tuple[int, int],
                  camera: Any, *, threshold: float, refine: bool = True,
                  background_photons: float | None = None, psf_calibration: str | None = None,
                  ) -> tuple[np.ndarray, float, np.ndarray]:
    """One frame's network maps (1, C, H', W') → (localizations, background photons/px, the flat index
    row * W + column of each localization's peak pixel in `shape`: a tile's result is merged by it).

    With `refine`, isolated detections get a maximum-likelihood position
    (inference/refine.py) when the model card carries its PSF calibration, the
    fit's local background, and the precision of that fit (its Cramér–Rao bound)
    as their uncertainty. The PSF is the card's astigmatic Gaussian, or a bead
    calibration (`inference/psf.py`, a .npz) given as `psf_calibration` or named
    by the card under that key; the camera's `read_noise_e` (where it has one) enters the
    likelihood. With a bead calibration, detections that its rings explain
    (`refine.ring_ghosts`) are dropped. The background is the frame's median (`frame_background`),
    or `background_photons`: a tile of a larger frame is given the whole frame's.
    """
    background = frame_background(photons) if background_photons is None else background_photons
    locs, peak_index = decode_maps(maps, shape, card, pixel_size_nm=camera.pixel_size_nm,
                                   threshold=threshold, background_photons=background)
    if refine and "astigmatism" in card and len(locs):
        calibration = psf_calibration or card.get("psf_calibration")
        psf = load_psf(calibration) if calibration else None
        camera_noise = {"read_noise_e": getattr(camera, "read_noise_e", 0.0), "em_gain": getattr(camera, "em_gain", 1.0)}
        locs, refined = refine_positions(photons, locs, qe=camera.qe, pixel_size_nm=camera.pixel_size_nm,
                                         astig=card["astigmatism"], background=locs[:, 6], psf=psf, **camera_noise)
        if psf is not None:  # the calibration knows the PSF's rings: detections that are only those go
            keep = ~ring_ghosts(photons, locs, refined, psf, qe=camera.qe, pixel_size_nm=camera.pixel_size_nm,
                                **camera_noise)
            locs, peak_index = locs[keep], peak_index[keep]
    return locs, background, peak_index


def frame_background(photons: np.ndarray) -> float:
    """A frame's background photons/px: the median of its finite pixels, 0 where there are none."""
    return float(np.nanmedian(photons)) if np.isfinite(photons).any() else 0.0


def localize_frame(model: LoadedModel, frame_adu: np.ndarray, camera: Any, *,
                   threshold: float, refine: bool = True, psf_calibration: str | None = None,
                   ) -> tuple[np.ndarray, float]:
    """One raw frame (ADU), or a (T, H, W) window ending at it → (localizations, background photons/px)."""
    return localize_photons(model, frame_to_photons(frame_adu, camera), camera, threshold=threshold,
                            refine=refine, psf_calibration=psf_calibration)
