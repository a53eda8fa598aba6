"""Quick-look images: a frame as an 8-bit PNG with a percentile stretch."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def auto_contrast(frame: np.ndarray, low_percentile: float = 0.5, high_percentile: float = 99.5) -> np.ndarray:
    """frame: (Y, X) any numeric dtype → (Y, X) uint8, `low`..`high` percentiles stretched to 0..255."""
    data = np.asarray(frame, dtype=np.float32)
    lo, hi = np.percentile(data, [low_percentile, high_percentile])
    if not hi > lo:  # a flat frame: mid grey rather than a division by zero
        return np.full(data.shape, 128 if data.size else 0, dtype=np.uint8)
    return (np.clip((data - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """(Y, X) uint8 → PNG file contents."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
