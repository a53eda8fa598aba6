"""Scores of a closed-loop run against the simulation's ground truth, shared by the scenarios."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from smartscope.scenarios.closed_loop import ClosedLoopRun
    from smartscope.simulation.microscope import FrameTruth


def rolling_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` frames: element i averages x[i-window+1 .. i]; NaN before.

    NaN values (no count for that frame) are left out of their windows.
    """
    x = np.asarray(x, dtype=float)
    out = np.full(x.size, np.nan)
    if x.size >= window:
        valid = np.isfinite(x)
        c = np.cumsum(np.concatenate([[0.0], np.where(valid, x, 0.0)]))
        n = np.cumsum(np.concatenate([[0], valid.astype(int)]))
        sums, counts = c[window:] - c[:-window], n[window:] - n[:-window]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[window - 1:] = np.where(counts > 0, sums / counts, np.nan)
    return out


def settling_frame(relative_error: np.ndarray, tolerance: float, hold_frames: int) -> int | None:
    """First frame from which |error| stays ≤ tolerance for `hold_frames` frames (or to the end).

    None if that never happens.
    """
    ok = np.abs(np.nan_to_num(np.asarray(relative_error, dtype=float), nan=np.inf)) <= tolerance
    runs = np.zeros(ok.size + 1, dtype=int)  # runs[i]: ok frames in a row from i
    for i in range(ok.size - 1, -1, -1):
        runs[i] = runs[i + 1] + 1 if ok[i] else 0
    for i in range(ok.size):
        if runs[i] > 0 and runs[i] >= min(hold_frames, ok.size - i):
            return i
    return None


def density_error(counts: np.ndarray, set_point: float, window: int) -> np.ndarray:
    """Relative error of the `window`-frame trailing mean count vs the set point (NaN at first)."""
    return (rolling_mean(counts, window) - set_point) / set_point


def event_intervals(run: ClosedLoopRun) -> list[tuple[float, float]]:
    """(onset, end) of every fission event the frames showed, clipped to the run (simulation s)."""
    t0, t1 = run.t_s[0], run.t_s[-1] + run.states["interval_ms"][-1] / 1000
    spans = {}
    for truth in run.truths:
        for ev in getattr(truth, "events", []):
            spans[ev.id] = (max(ev.onset_s, t0), min(ev.end_s, t1))
    return sorted(spans.values())


def resolved_truth(locs: np.ndarray, truth: FrameTruth, tolerance_nm: float = 100.0) -> int:
    """Localizations that found a true emitter within `tolerance_nm` laterally (greedy, nearest first)."""
    if len(locs) == 0 or truth.id.size == 0:
        return 0
    d = np.hypot(locs[:, None, 0] - truth.x_nm[None, :], locs[:, None, 1] - truth.y_nm[None, :])
    pairs = np.argwhere(d <= tolerance_nm)
    order = np.argsort(d[pairs[:, 0], pairs[:, 1]])
    used_l, used_t, n = set(), set(), 0
    for i, j in pairs[order]:
        if i not in used_l and j not in used_t:
            used_l.add(i)
            used_t.add(j)
            n += 1
    return n
