"""Train the fission-event detector on the live-mode simulation and export it to ONNX.

A small 2D U-Net sees a causal window of EVENT_FRAMES (5) frames as channels,
the newest frame t and keyframes WINDOW_SPACING_MS apart before it, as the
worker's EventWindow builds it (2 s of history: a constriction takes 4 s),
each window normalised by its own percentiles (so brightness, bleaching and
camera gain do not matter), and outputs a per-pixel event probability for
frame t.
Targets are Gaussian blobs (σ = 2 px) at every event that is
constricting or dividing in frame t. Every training episode draws a new
microscope (DeepTrack's lesson: vary what real data will vary): tubule width,
brightness, background, read noise, pixel size, motion, drift, defocus and
frame interval, so the detector does not learn one rendering. At run time
(and in the card's evaluation) each window runs with its three mirror images
and the four maps are averaged (`inference.events.mirror_views`).

`smartscope train events --seed 0` reproduces models/events.onnx and its card.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smartscope.inference.events import EVENT_FRAMES, WINDOW_PERCENTILES, mirror_views, normalise_window
from smartscope.training.common import UNet2d, export_onnx, fit, seed_everything
from smartscope.training.episodes import MAX_DELAY_FRAMES, SWITCH_FALSE_PER_MIN, TAIL_FRAMES, TARGET_SIGMA_PX, TILE_PX
from smartscope.training.episodes import VARIETY, evaluate, heatmap, held_out_episodes, random_microscope
from smartscope.training.episodes import simulate_episode

# At run time the window's frames are at least this far apart (EventWindow): inside
# the training intervals, where the model sees a constriction change between frames.
WINDOW_SPACING_MS = 500.0
EPISODES = 2000  # simulated microscopes to train on (0.07 s each; 2000 x 30 frames of 64² is 1 GB)
EVAL_EPISODES = 96  # per set, about 740 events; sets of 96 differ by about ±0.02 in F1
# Share of training windows spaced as at run time (the rest: consecutive frames). 1.0 since
# the 5-frame model; 3-frame models scored alike at 0.5 and 1.0 (0.913 and 0.918, mean F1 of 4 sets).
KEYFRAME_WINDOWS = 1.0

METRICS_PROTOCOL = (f"{EVAL_EPISODES} fresh test episodes x 40 frames, each a new random microscope, run "
                    f"{TAIL_FRAMES} frames on (events that begin in those are not scored, objects are); maps "
                    "averaged over each window's 4 mirror views (mirror_views); detections "
                    "(peaks above threshold) linked over frames into objects within 5 px, an object "
                    "counting from its min_frames-th detection; an event is found if an object lies "
                    "on it while it is active; precision over objects; delay = confirmation frame - "
                    "first active frame; windows of keyframes window_spacing_ms apart, as the worker "
                    "builds them; false_per_min: false objects per minute imaged; threshold and "
                    f"min_frames: the best F1 with a median delay <= {MAX_DELAY_FRAMES} frames on "
                    f"{EVAL_EPISODES} other (validation) episodes, scored on the test ones "
                    "(validation_best: its validation score); switch_threshold (the frame-rate "
                    "policy's): the lowest threshold at min_frames with <= "
                    f"{SWITCH_FALSE_PER_MIN:g} false objects per minute on the validation episodes "
                    "(switch: its test score)")


class EventNet(nn.Module):
    """2D U-Net 16-32-64: (B, 3, H, W) normalised window → (B, 1, H, W) event probability."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = UNet2d(EVENT_FRAMES, width)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.backbone(x)))


def _dataset(rng: np.random.Generator, episodes: int, frames: int
             ) -> list[tuple[np.ndarray, list[np.ndarray], float]]:
    data = []
    for i in range(episodes):
        scope, interval = random_microscope(rng)
        data.append((*simulate_episode(scope, frames, interval), interval))
        if (i + 1) % max(1, episodes // 5) == 0:
            print(f"  simulated {i + 1}/{episodes} episodes", flush=True)
    return data


def _batch(rng: np.random.Generator, data, batch: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((batch, EVENT_FRAMES, TILE_PX, TILE_PX), np.float32)
    y = np.empty((batch, 1, TILE_PX, TILE_PX), np.float32)
    for b in range(batch):
        frames, events, interval_ms = data[rng.integers(len(data))]
        # as the worker's EventWindow builds it (keyframes WINDOW_SPACING_MS apart), or consecutive
        step = int(np.ceil(WINDOW_SPACING_MS / interval_ms - 1e-6)) if rng.random() < KEYFRAME_WINDOWS else 1
        t = int(rng.integers((EVENT_FRAMES - 1) * step, len(frames)))
        win = normalise_window(frames[t - (EVENT_FRAMES - 1) * step : t + 1 : step])
        target = heatmap(events[t][:, 1:], frames.shape[1:])
        k, flip = int(rng.integers(4)), bool(rng.integers(2))  # the physics has no preferred direction
        win, target = np.rot90(win, k, axes=(1, 2)), np.rot90(target, k)
        if flip:
            win, target = win[:, :, ::-1], target[:, ::-1]
        x[b], y[b, 0] = win, target
    return x, y


def card_metrics(run: Callable[[np.ndarray], np.ndarray], seed: int) -> dict[str, Any]:
    """The card's metrics of `run` (normalised (N, frames, H, W) windows → (N, 1, H, W) maps:
    the torch net in training, or the shipped ONNX session to re-score a card)
    on the held-out episodes of `seed`: with mirror views as at run time, and
    (one_view) without, for the cost trade."""
    held_out = held_out_episodes(seed, episodes=EVAL_EPISODES)
    metrics = evaluate(mirror_views(run), held_out, spacing_ms=WINDOW_SPACING_MS)
    one_view = evaluate(run, held_out, spacing_ms=WINDOW_SPACING_MS)
    return {"protocol": METRICS_PROTOCOL, **metrics,
            "one_view": {k: one_view[k] for k in ("best_threshold", "best_min_frames", "best")}}


def train_and_export(seed: int = 0, out_dir: Path = Path("models"), steps: int | None = None,
                     batch: int = 16, log_every: int = 100) -> dict[str, Any]:
    steps = steps or 6000
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    print("simulating training episodes…", flush=True)
    data = _dataset(rng, episodes=EPISODES, frames=30)
    net = EventNet()

    def next_batch() -> tuple[torch.Tensor, ...]:
        x, y = _batch(rng, data, batch)
        return torch.from_numpy(x), torch.from_numpy(y)

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy(pred, target, weight=1 + 2 * target)

    fit(net, next_batch, loss_fn, steps, log_every=log_every)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    metrics = card_metrics(run, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "events.onnx"
    export_onnx(net, torch.zeros(1, EVENT_FRAMES, 64, 64), onnx_path, "window", "event_map")
    card = {
        "name": "events",
        "version": 2,  # 2: 5 frames in (1: 3)
        "file": onnx_path.name,
        "task": "fission-event detection in live (iSIM-like) mitochondria imaging: per-pixel event probability",
        "architecture": f"2D U-Net 16-32-64, causal window of {EVENT_FRAMES} frames as channels",
        "inputs": [{"name": "window", "shape": ["N", EVENT_FRAMES, "H", "W"], "dtype": "float32",
                    "description": f"frame t and {EVENT_FRAMES - 1} keyframes before it, window_spacing_ms apart, "
                                   "oldest first (any units), each window scaled from its "
                                   f"{WINDOW_PERCENTILES[0]:g}th to {WINDOW_PERCENTILES[1]:g}th percentile -> 0..1"}],
        "outputs": [{"name": "event_map", "shape": ["N", 1, "H", "W"],
                     "description": "probability that an event (constricting or dividing) is at this pixel in frame t"}],
        "normalisation": {"percentiles": list(WINDOW_PERCENTILES), "range": [0, 1]},
        "frames": EVENT_FRAMES,
        "window_spacing_ms": WINDOW_SPACING_MS,
        "mirror_views": True,  # run on the window and its 3 mirror images, maps averaged (card_run)
        "threshold": metrics["best_threshold"],
        "min_frames": metrics["best_min_frames"],
        "switch_threshold": metrics["switch_threshold"],
        "input_multiple_px": 4,
        "min_input_px": 16,
        "pixel_size_nm": None,
        "parameters": sum(p.numel() for p in net.parameters()),
        "training": {"seed": seed, "steps": steps, "batch": batch, "episodes": EPISODES, "frames_per_episode": 30,
                     "tile_px": TILE_PX, "target": f"Gaussian blobs, sigma {TARGET_SIGMA_PX} px",
                     "loss": "weighted BCE (1 + 2 x target)", "variety": VARIETY,
                     "augmentation": "rot90 and flips",
                     "keyframe_windows": KEYFRAME_WINDOWS, "seconds": round(time.time() - t0, 1),
                     "torch": torch.__version__},
        "metrics": metrics,
        "retrain_command": f"smartscope train events --seed {seed}" + (f" --steps {steps}" if steps != 6000 else ""),
    }
    onnx_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return card
