"""Merging: one row per blink, from a molecule's localizations in consecutive frames (ThunderSTORM-style).

A localization joins the track of the nearest open track within
`max_distance_nm` (one localization per track per frame, closest pairs first);
a track stays open through `max_gap_frames` frames without a localization
(a blink that dims for a frame). The merged row sits at the mean of its
localizations weighted by 1/uncertainty², with that mean's uncertainty,
their photons summed, the first frame, and `detections`: how many were merged.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartscope.analysis.table import BG, DETECTIONS, PHOTONS, UNC, X, Y, Z


class MergeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_distance_nm: float = Field(50.0, gt=0, description="farthest a blink's next localization may be")
    max_gap_frames: int = Field(1, ge=0, description="frames a blink may go unseen and still continue")


def link(table: dict[str, np.ndarray], settings: MergeSettings | None = None) -> np.ndarray:
    """The track (group) of each row of `table`: int64 labels 0..n_groups-1, in order of first frame."""
    s = settings or MergeSettings()
    frame, x, y = table["frame"], table[X], table[Y]
    order = np.argsort(frame, kind="stable")
    labels = np.full(len(frame), -1, np.int64)
    track_xy = np.empty((0, 2))
    track_last = np.empty(0, np.int64)
    track_id = np.empty(0, np.int64)
    n_tracks = 0
    bounds = np.flatnonzero(np.diff(frame[order])) + 1
    for rows in np.split(order, bounds):
        if not len(rows):
            continue
        f = frame[rows[0]]
        alive = track_last >= f - s.max_gap_frames - 1
        track_xy, track_last, track_id = track_xy[alive], track_last[alive], track_id[alive]
        xy = np.column_stack([x[rows], y[rows]])
        matched_row = np.zeros(len(rows), bool)
        if len(track_id):
            d = np.hypot(xy[:, None, 0] - track_xy[None, :, 0], xy[:, None, 1] - track_xy[None, :, 1])
            r, t = np.nonzero(d <= s.max_distance_nm)
            used_track = np.zeros(len(track_id), bool)
            for k in np.argsort(d[r, t], kind="stable"):
                if not matched_row[r[k]] and not used_track[t[k]]:
                    matched_row[r[k]], used_track[t[k]] = True, True
                    labels[rows[r[k]]] = track_id[t[k]]
                    track_xy[t[k]], track_last[t[k]] = xy[r[k]], f
        new = ~matched_row
        ids = np.arange(n_tracks, n_tracks + np.count_nonzero(new))
        n_tracks += len(ids)
        labels[rows[new]] = ids
        track_xy = np.vstack([track_xy, xy[new]])
        track_last = np.concatenate([track_last, np.full(len(ids), f)])
        track_id = np.concatenate([track_id, ids])
    return labels


def merge(table: dict[str, np.ndarray], settings: MergeSettings | None = None) -> dict[str, np.ndarray]:
    """One row per track of `link`, ordered by first frame (see the module docstring)."""
    labels = link(table, settings)
    n = int(labels.max()) + 1 if len(labels) else 0
    w = 1.0 / np.maximum(table[UNC], 1e-3) ** 2
    wsum = np.bincount(labels, w, n)
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, labels, table["frame"])
    count = np.bincount(labels, minlength=n)
    return {"frame": first,
            X: np.bincount(labels, w * table[X], n) / wsum,
            Y: np.bincount(labels, w * table[Y], n) / wsum,
            Z: np.bincount(labels, w * table[Z], n) / wsum,
            PHOTONS: np.bincount(labels, table[PHOTONS], n),
            BG: np.bincount(labels, table[BG], n) / np.maximum(count, 1),
            UNC: 1.0 / np.sqrt(wsum),
            DETECTIONS: count.astype(np.int64)}


def merge_scores(labels: np.ndarray, molecule: np.ndarray, frame: np.ndarray, max_gap_frames: int) -> dict:
    """How well `labels` (merged groups) follow the true molecules of each localization (`molecule`,
    -1 where a localization matches none).

    purity: the fraction of merged groups of ≥ 2 matched localizations that hold one molecule;
    split: the fraction of true blinks (a molecule's matched localizations with gaps of at most
    `max_gap_frames`, ≥ 2 of them) whose localizations went to more than one group.
    """
    m = molecule >= 0
    labels, molecule, frame = labels[m], molecule[m], frame[m]
    groups = {}
    for g, mol in zip(labels.tolist(), molecule.tolist(), strict=True):
        groups.setdefault(g, []).append(mol)
    multi = [set(v) for v in groups.values() if len(v) >= 2]
    pure = sum(len(v) == 1 for v in multi)
    order = np.lexsort((frame, molecule))
    mol_s, frame_s, lab_s = molecule[order], frame[order], labels[order]
    new_blink = np.r_[True, (mol_s[1:] != mol_s[:-1]) | (np.diff(frame_s) > max_gap_frames + 1)]
    blink = np.cumsum(new_blink) - 1
    sizes = np.bincount(blink)
    pairs = np.unique(np.column_stack([blink, lab_s]), axis=0)
    n_labels = np.bincount(pairs[:, 0], minlength=len(sizes))[sizes >= 2]
    return {"groups": len(groups), "groups_multi": len(multi), "purity": pure / len(multi) if multi else None,
            "blinks_multi": int(len(n_labels)),
            "split_fraction": float(np.mean(n_labels > 1)) if len(n_labels) else None}
