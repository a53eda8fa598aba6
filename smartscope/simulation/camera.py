"""The camera's photon → ADU chain and its inverse.

Kept as two pure functions so that the simulator, the localizer's photon
calibration and the tests all use the same conversion.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import gammaln

if TYPE_CHECKING:
    from smartscope.simulation.config import CameraConfig


def photons_to_adu(
    expected_photons: np.ndarray, camera: CameraConfig, rng: np.random.Generator
) -> np.ndarray:
    """A noisy frame (uint16 ADU) from the expected photons per pixel (float, any shape).

    Shot noise: Poisson(photons * qe) electrons; EMCCD (em_gain > 1): gamma-
    distributed gain, which doubles the variance (excess noise factor 2); read
    noise: Normal(0, read_noise_e) electrons; then electrons / e_per_adu +
    offset_adu, rounded and clipped to the ADC range.
    """
    electrons = poisson_counts(np.asarray(expected_photons, dtype=np.float64) * camera.qe, rng)
    if camera.em_gain > 1.0:
        # Sum of `electrons` exponential gain stages: gamma(shape=n, scale=gain); 0 stays 0.
        signal = rng.gamma(electrons, camera.em_gain).astype(np.float32)
    else:
        signal = electrons
    if camera.read_noise_e > 0:
        noise = rng.standard_normal(signal.shape, dtype=np.float32)
        noise *= np.float32(camera.read_noise_e)
        signal += noise
    signal *= np.float32(1.0 / camera.e_per_adu)
    signal += np.float32(camera.offset_adu + 0.5)  # +0.5 then floor == round half up
    np.clip(signal, 0, 2**camera.bit_depth - 1, out=signal)
    return signal.astype(np.uint16)


def adu_to_photons(frames_adu: np.ndarray, camera: CameraConfig) -> np.ndarray:
    """Photons reaching the camera, estimated per pixel (float32, same shape).

    The inverse of the mean of photons_to_adu: (adu - offset) * e_per_adu / qe / em_gain.
    """
    scale = camera.e_per_adu / (camera.qe * camera.em_gain)
    frames = np.asarray(frames_adu, dtype=np.float32)
    return (frames - np.float32(camera.offset_adu)) * np.float32(scale)


def poisson_counts(mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson counts (float32, same shape) with the given means; exact, and fast on SMLM frames.

    A frame is a common floor (the background) plus sparse PSFs, and a sum of
    independent Poisson variables is Poisson: so the floor is drawn for all
    pixels by table inversion (about 4x faster than Generator.poisson at
    ~20 photons) and only the pixels above it get a second, small draw.
    """
    mean = np.asarray(mean, dtype=np.float64)
    lowest = float(mean.min()) if mean.size else 0.0
    if not np.isfinite(lowest) or lowest < 0:
        raise ValueError("Poisson means must be finite and >= 0")
    if mean.size < _TABLE_MIN_PIXELS or not _TABLE_MIN <= lowest <= _TABLE_MAX:
        return rng.poisson(mean).astype(np.float32)  # numpy is as fast here
    floor = np.floor(lowest * 16.0) / 16.0  # on a grid, so the table is cached across frames
    counts = _poisson_constant(floor, mean.size, rng)
    excess = mean.ravel() - floor
    above = np.flatnonzero(excess > 0)
    counts[above] += rng.poisson(excess[above])
    return counts.reshape(mean.shape)


_GUIDE_BINS = 4096
_TABLE_MIN, _TABLE_MAX = 5.0, 1e4  # floor means (photoelectrons) the table serves
_TABLE_MIN_PIXELS = 4096  # below this a table costs more than it saves


@lru_cache(maxsize=32)
def _poisson_table(mean: float) -> tuple[np.ndarray, np.ndarray]:
    """CDF of Poisson(mean) out to mean + 12 sd (tail < 1e-30) and its guide table."""
    k_max = int(np.ceil(mean + 12.0 * np.sqrt(mean) + 12.0))
    k = np.arange(k_max + 1)
    cdf = np.cumsum(np.exp(k * np.log(mean) - mean - gammaln(k + 1.0)))
    cdf[-1] = 1.0
    guide = np.searchsorted(cdf, np.arange(_GUIDE_BINS) / _GUIDE_BINS, side="left")
    return cdf, guide


def _poisson_constant(mean: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` Poisson(mean) draws (float32) by guide-table inversion of uniforms."""
    cdf, guide = _poisson_table(mean)
    u = rng.random(size)
    k = guide[(u * _GUIDE_BINS).astype(np.intp)]
    while True:  # step up to the first k with cdf[k] >= u; one or two passes
        low = cdf[k] < u
        if not low.any():
            break
        k += low
    return k.astype(np.float32)
