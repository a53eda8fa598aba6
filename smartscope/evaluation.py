"""SMLM scoring as in the SMLM Challenge 2016: greedy nearest-first matching per frame.

A localization matches the nearest unmatched ground-truth emitter of the same
frame within the lateral tolerance (250 nm by default); pairs are taken in
order of distance. Jaccard = TP / (TP + FP + FN); RMSE over matched pairs.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def match_frame(truth_xy_nm: np.ndarray, pred_xy_nm: np.ndarray, tol_nm: float = 250.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Indices (truth_idx, pred_idx) of greedy nearest-first matches within tol_nm."""
    if len(truth_xy_nm) == 0 or len(pred_xy_nm) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    pairs = cKDTree(truth_xy_nm).sparse_distance_matrix(cKDTree(pred_xy_nm), tol_nm, output_type="ndarray")
    order = np.argsort(pairs["v"], kind="stable")
    used_t, used_p, ti, pi = set(), set(), [], []
    for i, j in zip(pairs["i"][order], pairs["j"][order], strict=True):
        if i not in used_t and j not in used_p:
            used_t.add(i)
            used_p.add(j)
            ti.append(i)
            pi.append(j)
    return np.asarray(ti, int), np.asarray(pi, int)


def score(truth: list[np.ndarray], pred: list[np.ndarray], tol_nm: float = 250.0) -> dict[str, float]:
    """Per-frame lists of (N, ≥3) arrays x_nm, y_nm, z_nm → challenge metrics."""
    tp = fp = fn = 0
    dxy, dz = [], []
    for t, p in zip(truth, pred, strict=True):
        ti, pi = match_frame(t[:, :2], p[:, :2], tol_nm)
        tp += len(ti)
        fp += len(p) - len(pi)
        fn += len(t) - len(ti)
        if len(ti):
            dxy.append(p[pi, :2] - t[ti, :2])
            dz.append(p[pi, 2] - t[ti, 2])
    d = np.concatenate(dxy) if dxy else np.zeros((0, 2))
    z = np.concatenate(dz) if dz else np.zeros(0)
    jaccard = tp / max(tp + fp + fn, 1)
    rmse_lat = float(np.sqrt(np.mean(np.sum(d**2, axis=1)))) if len(d) else float("nan")
    return {
        "jaccard": round(jaccard, 4),
        "recall": round(tp / max(tp + fn, 1), 4),
        "precision": round(tp / max(tp + fp, 1), 4),
        "rmse_lateral_nm": round(rmse_lat, 2),
        "rmse_x_nm": round(float(np.sqrt(np.mean(d[:, 0] ** 2))), 2) if len(d) else float("nan"),
        "rmse_axial_nm": round(float(np.sqrt(np.mean(z**2))), 2) if len(z) else float("nan"),
        "efficiency_lateral": round(1 - float(np.sqrt((1 - jaccard) ** 2 + (0.01 * rmse_lat) ** 2)), 4)
        if len(d) else float("nan"),
        "tp": tp, "fp": fp, "fn": fn,
    }
