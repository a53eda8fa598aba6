"""Fourier ring correlation: the resolution of a localization image (Nieuwenhuizen et al. 2013).

The localizations are split into two halves by blocks of `block_frames`
frames, each block to a half at random (seeded): a blink's repeated
localizations in consecutive frames stay in one half, so the halves agree
only as far as the structure does (a split of single localizations would see
the localization precision alone, blind to drift). Each half is rendered as
a 2-D histogram at `pixel_nm`; the correlation of their Fourier transforms
over rings of spatial frequency q, smoothed along q, falls from 1 to noise.
The resolution is 1/q where it first drops below 1/7. The pixel must be well
below the resolution (a quarter of it or less) for the crossing to be seen.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.ndimage import uniform_filter1d

from smartscope.analysis.table import X, Y, write_csv

THRESHOLD = 1 / 7


class FrcSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pixel_nm: float = Field(5.0, gt=0, description="pixel of the two renderings")
    block_frames: int = Field(50, ge=1, description="frames that go to one half together")
    seed: int = Field(0, description="the random split into halves")


def frc_curve(table: dict[str, np.ndarray], settings: FrcSettings | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(q [1/nm], FRC) over rings of the square rendering, the ring at q=0 left out."""
    s = settings or FrcSettings()
    x, y = table[X], table[Y]
    if len(x) < 2:
        raise ValueError(f"{len(x)} localizations: FRC needs two halves")
    block = table["frame"] // s.block_frames
    half = (np.random.default_rng(s.seed).random(int(block.max()) + 1) < 0.5)[block]
    if half.all() or not half.any():
        raise ValueError(f"all localizations fell in one half: FRC needs more than one block of {s.block_frames} "
                         "frames")
    n = int(np.ceil(max(np.ptp(x), np.ptp(y)) / s.pixel_nm)) + 2
    ix = ((x - x.min()) / s.pixel_nm).astype(np.int64) + 1
    iy = ((y - y.min()) / s.pixel_nm).astype(np.int64) + 1

    def transform(mask: np.ndarray) -> np.ndarray:
        """The rendering's Fourier transform, single precision (an n² image at 5 nm is large)."""
        img = np.zeros((n, n), np.float32)
        np.add.at(img, (iy[mask], ix[mask]), 1.0)
        return np.fft.rfft2(img)

    f1, f2 = transform(half), transform(~half)
    ky, kx = np.fft.fftfreq(n) * n, np.arange(f1.shape[1])
    ring = np.rint(np.hypot(ky[:, None], kx[None, :])).astype(np.int32).ravel()
    # the half-plane of a real image's transform: every column but the first (and the Nyquist) stands for two
    twice = np.where((kx > 0) & (kx < n / 2), 2.0, 1.0).astype(np.float32)[None, :]
    rings = n // 2

    def ring_sum(values: np.ndarray) -> np.ndarray:
        return np.bincount(ring, (values * twice).ravel(), rings + 1)[1:rings + 1]

    num = ring_sum((f1 * np.conj(f2)).real)
    p1, p2 = ring_sum(np.abs(f1) ** 2), ring_sum(np.abs(f2) ** 2)
    curve = num / np.sqrt(np.maximum(p1 * p2, 1e-30))
    curve = uniform_filter1d(curve, size=max(3, rings // 50), mode="nearest")
    q_per_nm = np.arange(1, rings + 1) / (n * s.pixel_nm)
    return q_per_nm, curve


def frc_resolution_nm(q_per_nm: np.ndarray, curve: np.ndarray) -> float | None:
    """1/q at the first crossing of 1/7 (linear between rings); None if the curve never falls below it
    (the pixel limits: use a smaller one)."""
    below = np.flatnonzero(curve < THRESHOLD)
    if not len(below):
        return None
    i = below[0]
    if i == 0:
        return float(1 / q_per_nm[0])
    q = np.interp(THRESHOLD, [curve[i], curve[i - 1]], [q_per_nm[i], q_per_nm[i - 1]])
    return float(1 / q)


def frc(table: dict[str, np.ndarray], settings: FrcSettings | None = None) -> float | None:
    """The FRC resolution (nm) of `table`, see `frc_resolution_nm`."""
    return frc_resolution_nm(*frc_curve(table, settings))


def write_frc_csv(path, q_per_nm: np.ndarray, curve: np.ndarray) -> None:
    write_csv(path, ("q [1/nm]", "frc"), ((f"{a:.6g}", f"{b:.4f}") for a, b in zip(q_per_nm, curve, strict=True)))
