"""Emitter counting (HD-SMLM class): a causal 3-frame window → per-pixel counts → density.

The per-frame count (and density per µm²) is what the illumination policy
regulates in dense data, where single-molecule localization undercounts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scipy.ndimage import maximum_filter

from smartscope.evaluation import match_frame
from smartscope.inference.session import LoadedModel
from smartscope.training.stacks import normalise_stack

PUBLISHED_MIN_SNR = 2.0  # the published HD-SMLM counter's ground truth left out emitters below this


def counts_to_positions(counts: np.ndarray, pixel_size_nm: float) -> np.ndarray:
    """(H, W) integer counts → (K, 2) emitter positions: pixel centres, repeated by count."""
    iy, ix = np.nonzero(counts)
    reps = counts[iy, ix]
    return np.column_stack([(np.repeat(ix, reps) + 0.5) * pixel_size_nm, (np.repeat(iy, reps) + 0.5) * pixel_size_nm])


def score_counts(truth: list[np.ndarray], pred: list[np.ndarray], tol_nm: float,
                 min_snr: float | None = None) -> dict[str, float]:
    """Precision / recall / F1 with tolerance matching, and the per-frame relative count error.

    With `min_snr`, truth rows (x_nm, y_nm, snr) below it are ignored, as the
    published HD-SMLM scoring leaves them out: matching still runs against every
    emitter, but a faint one is neither a miss nor, when found, a false positive.
    """
    tp = fp = fn = 0
    count_err = []
    for t, p in zip(truth, pred, strict=True):
        ti, _ = match_frame(t[:, :2], p[:, :2], tol_nm)
        counted = np.ones(len(t), bool) if min_snr is None else t[:, 2] >= min_snr
        found = np.zeros(len(t), bool)
        found[ti] = True
        hits, n_true = int((found & counted).sum()), int(counted.sum())
        false = len(p) - len(ti)
        tp, fp, fn = tp + hits, fp + false, fn + n_true - hits
        if n_true:
            count_err.append(abs(hits + false - n_true) / n_true)  # predicted count leaves the ignored out
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
            "median_count_error": round(float(np.median(count_err)), 4) if count_err else None,
            "tp": tp, "fp": fp, "fn": fn}


def decode_counts(logits: np.ndarray, threshold: float) -> np.ndarray:
    """(4, H, W) class logits → (H, W) counts.

    A pixel holds emitters where its occupancy probability 1 − P(0) is a
    local maximum (3×3) above `threshold`; how many is the likeliest of the
    classes 1, 2, 3+. Peaks rather than a per-pixel argmax, because the
    network spreads an emitter near a pixel border over two pixels.
    """
    z = logits - logits.max(0, keepdims=True)
    p = np.exp(z)
    p /= p.sum(0, keepdims=True)
    occupancy = 1 - p[0]
    peaks = (occupancy >= threshold) & (occupancy == maximum_filter(occupancy, size=3, mode="constant"))
    return np.where(peaks, p[1:].argmax(0) + 1, 0)


def count_frame(model: LoadedModel, window_photons: np.ndarray) -> np.ndarray:
    """(T, H, W) photons, oldest first → (H, W) counts of the last frame (classes 0..3)."""
    card: dict[str, Any] = model.card
    t, h, w = window_photons.shape
    if t != card["frames"]:
        raise ValueError(f"counting model needs {card['frames']} frames, got {t}")
    stack = np.nan_to_num(np.asarray(window_photons, np.float32), nan=float(np.nanmedian(window_photons)))
    multiple = int(card.get("input_multiple_px", 1))
    stack = np.pad(stack, ((0, 0), (0, (-h) % multiple), (0, (-w) % multiple)), mode="edge")
    logits = model.run(normalise_stack(stack)[None, None])[0, :, :h, :w]
    return decode_counts(logits, float(card["occupancy_threshold"]))
