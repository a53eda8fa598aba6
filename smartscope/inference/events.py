"""Event detection (event-driven acquisition class): a window of keyframes → event map → score.

The per-frame event score (the map's maximum) drives the frame-rate policy;
the map's peaks are the event locations. Object-level scoring: an event is
found if a detection lies within the tolerance of it in any frame while it is
active; the delay is the first such frame minus the event's first active frame.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.ndimage import maximum_filter

from smartscope.inference.session import LoadedModel, fill_non_finite

EVENT_FRAMES = 5  # the newest frame and 4 keyframes before it: 2 s of history at 500 ms spacing
MATCH_TOLERANCE_PX = 5.0
#: each window is scaled to its own low..high percentiles: training uses these and writes them into the card
WINDOW_PERCENTILES = (1.0, 99.9)


def normalise_window(window: np.ndarray, low_pct: float = WINDOW_PERCENTILES[0],
                     high_pct: float = WINDOW_PERCENTILES[1]) -> np.ndarray:
    """(T, H, W) frames in any linear unit → float32 scaled to the window's percentiles, 0…1."""
    w = fill_non_finite(window)
    lo, hi = np.percentile(w, [low_pct, high_pct])
    return np.clip((w - lo) / max(hi - lo, 1e-6), 0, 1.5).astype(np.float32)


def detect_events(event_map: np.ndarray, threshold: float, min_distance_px: int = 5) -> tuple[float, np.ndarray]:
    """(score, (K, 3) x_px, y_px, p): the map's maximum and its peaks above threshold."""
    score = float(event_map.max()) if event_map.size else 0.0
    peaks = (event_map >= threshold) & (event_map == maximum_filter(event_map, size=2 * min_distance_px + 1))
    iy, ix = np.nonzero(peaks)
    return score, np.column_stack([ix + 0.5, iy + 0.5, event_map[iy, ix]]).reshape(-1, 3)


def persistent_score(current: np.ndarray, previous: list[np.ndarray], tol_px: float = MATCH_TOLERANCE_PX) -> float:
    """The frame's event score, counting only what each of the previous frames' maps
    also saw nearby: the causal form of requiring an object in 1 + len(previous)
    frames (single-frame flickers do not switch the frame rate). With no previous
    maps: the plain maximum."""
    size = 2 * int(np.ceil(tol_px)) + 1
    seen = current
    for prev in previous:
        seen = np.minimum(seen, maximum_filter(prev, size=size))
    return float(seen.max())


class EventWindow:
    """The event model's causal window: the newest frame and keyframes about
    `spacing_s` apart before it, instead of simply the last frames.

    Why: the model sees a fission as change between its frames, and was
    trained at 100-1000 ms intervals. At a fast frame rate three consecutive
    frames barely differ and the model sees nothing (on the frame-rate
    scenario's sample at 100 ms intervals an event pixel scored a median of
    0.05-0.07; with frames 500 ms apart, 0.85). When frames come slower than the
    spacing, every frame is a keyframe and the window is consecutive. frames − 1
    keyframes and the newest frame are kept, whatever the frame rate.

    A window that is not full yet (start of a stack, a new position or
    acquisition) is given from `min_window_frames` frames on (the card's; the
    newest frame counts): its oldest frame stands in for the ones still
    missing (`pad_window`), as the model that sets it was trained. Without it
    (older cards) only full windows are given.
    """

    def __init__(self, frames: int, spacing_s: float, min_window_frames: int | None = None) -> None:
        self.spacing_s = spacing_s
        self.frames = frames
        self.min_window_frames = frames if min_window_frames is None else max(1, min(min_window_frames, frames))
        self._keyframes: deque[tuple[float, np.ndarray]] = deque(maxlen=frames - 1)
        self._stream: object = None

    def push(self, stream: object, t_s: float, photons: np.ndarray) -> np.ndarray | None:
        """Add a frame of `stream` (an acquisition) taken at t_s; the (frames, H, W) window
        ending in it, or None until it holds min_window_frames frames. A new stream or
        frame shape starts over."""
        if stream != self._stream or (self._keyframes and self._keyframes[-1][1].shape != photons.shape):
            self._keyframes.clear()
            self._stream = stream
        window = None
        if len(self._keyframes) + 1 >= self.min_window_frames:
            window = pad_window(np.stack([p for _, p in self._keyframes] + [photons]), self.frames)
        if not self._keyframes or t_s - self._keyframes[-1][0] >= self.spacing_s * (1 - 1e-6):
            self._keyframes.append((t_s, photons))
        return window


def pad_window(window: np.ndarray, frames: int) -> np.ndarray:
    """(k, H, W) frames, oldest first, k <= frames → (frames, H, W): the oldest repeated in front.

    A repeated frame shows no change, which is what the model learns a missing
    past to look like (training draws such short windows, `training.events`)."""
    missing = frames - len(window)
    return window if missing <= 0 else np.concatenate([np.repeat(window[:1], missing, axis=0), window])


def event_window_for(card: dict, spacing: bool = True) -> EventWindow:
    """The EventWindow a card asks for: its frames, window_spacing_ms (unless `spacing`
    is False: consecutive frames) and min_window_frames (default: full windows only)."""
    spacing_s = float(card.get("window_spacing_ms", 0.0)) / 1000 if spacing else 0.0
    return EventWindow(int(card["frames"]), spacing_s, card.get("min_window_frames"))


def outside_training(card: dict, pixel_size_nm: float, interval_ms: float | None = None) -> list[str]:
    """Where a stack lies outside what the event model was trained on (its card's
    training draw: VARIETY, widened by the randomisation where part of the episodes
    came from it), one sentence each: its card's figures do not hold there, and on
    a world the training never saw they fell to F1 0.03 (models/README.md)."""
    training = card.get("training", {})
    ranges = dict(training.get("variety", {}))
    if training.get("randomised_episodes"):
        for k, wide in training.get("randomisation", {}).items():
            if isinstance(wide, list) and len(wide) == 2:
                lo, hi = ranges.get(k, wide)
                ranges[k] = (min(lo, wide[0]), max(hi, wide[1]))
    found = []
    for label, key, value, unit in (("pixel size", "pixel_size_nm", pixel_size_nm, "nm"),
                                    ("interval", "interval_ms", interval_ms, "ms")):
        if value is not None and key in ranges and not ranges[key][0] <= value <= ranges[key][1]:
            lo, hi = ranges[key]
            found.append(f"{label} {value:g} {unit} is outside the {lo:g}-{hi:g} {unit} the event model "
                         f"({card.get('name', '?')} v{card.get('version', '?')}) was trained on")
    return found


def previous_maps_for(card: dict) -> int:
    """How many earlier frames' maps `persistent_score` needs: the card's min_frames − 1."""
    return max(int(card.get("min_frames", 1)) - 1, 0)


Run = Callable[[np.ndarray], np.ndarray]  # normalised (N, frames, H, W) windows → (N, 1, H, W) event maps


def mirror_views(run: Run) -> Run:
    """`run`, averaged over each window and its three mirror images (flipped in x,
    in y, in both), each map flipped back.

    Why: a fission has no preferred direction, and the model was trained with
    flips, so its four views err differently; their mean is the steadier map
    (on the card's test episodes, about half the false objects of one view at
    a higher F1: see its metrics and one_view). Mirror images keep the frame's
    shape, so the four views run as one batch.
    """
    def run_views(x: np.ndarray) -> np.ndarray:
        n = len(x)
        y = run(np.ascontiguousarray(np.concatenate([x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]])))
        return (y[:n] + y[n:2 * n, ..., ::-1] + y[2 * n:3 * n, ..., ::-1, :] + y[3 * n:, ..., ::-1, ::-1]) / 4
    return run_views


def card_run(model: LoadedModel, one_view: bool = False) -> Run:
    """The model's run as its card measured it: with mirror views where the card
    says so, unless `one_view` (a quarter of the compute, for slow machines: the
    card's metrics.one_view)."""
    return mirror_views(model.run) if model.card.get("mirror_views") and not one_view else model.run


def event_map(model: LoadedModel, window: np.ndarray, one_view: bool = False) -> np.ndarray:
    """(frames, H, W) window, oldest first → (H, W) event probability of the last frame."""
    t, h, w = window.shape
    if t != model.card["frames"]:
        raise ValueError(f"event model needs {model.card['frames']} frames, got {t}")
    m = int(model.card.get("input_multiple_px", 1))
    low_pct, high_pct = model.card["normalisation"]["percentiles"]
    x = np.pad(normalise_window(window, low_pct, high_pct), ((0, 0), (0, (-h) % m), (0, (-w) % m)), mode="edge")
    return card_run(model, one_view)(x[None])[0, 0, :h, :w]


def link_tracks(detections: list[np.ndarray], tol_px: float = MATCH_TOLERANCE_PX, max_gap: int = 2
                ) -> list[list[tuple[int, float, float, int]]]:
    """Link one episode's per-frame detections into objects: a detection joins the
    open track whose last detection is nearest, within tol_px and at most
    max_gap frames back. Each track is a list of (frame, x_px, y_px, index in
    that frame's detections)."""
    tracks: list[list[tuple[int, float, float, int]]] = []
    for t, det in enumerate(detections):
        open_tracks = [tr for tr in tracks if t - tr[-1][0] <= max_gap]
        taken: set[int] = set()
        for k, (x, y) in enumerate(np.asarray(det, float)[:, :2] if len(det) else []):
            dist = [np.inf if i in taken else np.hypot(x - tr[-1][1], y - tr[-1][2])
                    for i, tr in enumerate(open_tracks)]
            j = int(np.argmin(dist)) if dist else -1
            if j >= 0 and dist[j] <= tol_px:
                open_tracks[j].append((t, x, y, k))
                taken.add(j)
            else:
                tracks.append([(t, x, y, k)])
    return tracks


def persistent(detections: list[np.ndarray], min_frames: int, tol_px: float = MATCH_TOLERANCE_PX
               ) -> list[np.ndarray]:
    """Only the detections that belong to objects seen in at least `min_frames` frames."""
    keep = [np.zeros(len(d), bool) for d in detections]
    for track in link_tracks(detections, tol_px):
        if len(track) >= min_frames:
            for t, _, _, k in track:
                keep[t][k] = True
    return [d[m] for d, m in zip(detections, keep, strict=True)]


def score_events(detections: list[list[np.ndarray]], truth: list[list[np.ndarray]],
                 tol_px: float = MATCH_TOLERANCE_PX, min_frames: int = 1, censor_last_frames: int = 0
                 ) -> dict[str, Any]:
    """Object-level scores. Per episode, per frame: detections (K, ≥2) x_px, y_px and
    active events (M, 3) id, x_px, y_px.

    Detections are linked over frames into objects (`link_tracks`); an object
    counts once it has `min_frames` detections (its confirmation frame).
    Precision: objects that lie on an active event at least once, over all
    objects. Recall: events that some object lies on. Delay: the first
    confirmation frame of an object on the event (or the frame it reaches the
    event, if later) minus the event's first active frame.
    `censor_last_frames`: events that begin in an episode's last frames are left
    out of recall and delay (objects on them still count as true), since the
    recording stops before any detector could confirm them, where a continuous
    run would go on.
    """
    found: dict[tuple[int, int], int] = {}
    first_active: dict[tuple[int, int], int] = {}
    true_objects = n_objects = 0
    for e, (det_ep, truth_ep) in enumerate(zip(detections, truth, strict=True)):
        onsets: dict[int, int] = {}
        for t, active in enumerate(truth_ep):
            for ev_id in active[:, 0].astype(int):
                onsets.setdefault(ev_id, t)
        first_active.update({(e, ev_id): t for ev_id, t in onsets.items() if t < len(truth_ep) - censor_last_frames})
        for track in link_tracks(det_ep, tol_px):
            if len(track) < min_frames:
                continue
            n_objects += 1
            confirmed_t = track[min_frames - 1][0]
            hits = {}
            for t, x, y, _ in track:
                active = truth_ep[t]
                if len(active):
                    near = np.hypot(active[:, 1] - x, active[:, 2] - y) <= tol_px
                    for ev_id in active[near, 0].astype(int):
                        hits.setdefault(ev_id, max(t, confirmed_t))
            true_objects += bool(hits)
            for ev_id, t in hits.items():
                if (e, ev_id) in first_active:
                    found[(e, ev_id)] = min(found.get((e, ev_id), t), t)
    n_events = len(first_active)
    recall = len(found) / n_events if n_events else 0.0
    precision = true_objects / n_objects if n_objects else 0.0
    delays = [t - first_active[k] for k, t in found.items()]
    return {"events": n_events, "found": len(found), "recall": round(recall, 4), "objects": n_objects,
            "false_objects": n_objects - true_objects, "precision": round(precision, 4),
            "f1": round(2 * precision * recall / max(precision + recall, 1e-9), 4),
            "median_delay_frames": float(np.median(delays)) if delays else None, "min_frames": min_frames}
