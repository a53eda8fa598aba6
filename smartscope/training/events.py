"""Train the fission-event detector on the live-mode simulation and export it to ONNX.

A small 2D U-Net sees a causal window of EVENT_FRAMES (5) frames as channels,
the newest frame t and keyframes WINDOW_SPACING_MS apart before it, as the
worker's EventWindow builds it (2 s of history: a constriction takes 4 s),
each window normalised by its own percentiles (so brightness, bleaching and
camera gain do not matter), and outputs a per-pixel event probability for
frame t.
Targets are Gaussian blobs (σ = 2 px) at every event that is
constricting or dividing in frame t. Every training episode draws a new
microscope (DeepTrack's lesson: vary what real data will vary) from VARIETY
(tubule width, brightness, background, read noise, pixel size, motion, drift,
defocus and frame interval); RANDOMISED_EPISODES of them (none since v12) from
the wider RANDOMISATION (pixel size 40-160 nm, PSF from SIM to widefield, haze,
uneven illumination, bleaching, EMCCD/sCMOS noise with per-pixel offsets,
intervals 0.2-15 s and constrictions 3-90 s, some episodes with no event), cut
at random from a larger field so crop edges cut structures anywhere.
At run time (and in the card's evaluation) each window runs with its three
mirror images and the four maps are averaged (`inference.events.mirror_views`).

Short windows: SHORT_WINDOWS of the training windows hold only 1-4 real
frames, the oldest repeated in front (`pad_window`), as `EventWindow` gives
them at the start of a stack or position (card: min_window_frames 1). The
convolutions pad by reflection, not zeros (v3's attempt at the borders).

`smartscope train events --seed 0 --init events-v2.onnx` (v2: `git show
7d2bac2:models/events.onnx`) fine-tunes v2 with this recipe, 6000 steps at
lr 5e-4: the shipped v12, which scores from the first frame. v3 and v11
put no detection on the held-out edge fields because the randomised episodes
made them quiet on that whole world, not because of the reflect padding or
the crops; those episodes also cost the confidence that the frame-rate policy
needs, so v12 leaves them out (models/README.md, events: the ablation). Half
the episodes randomised (v3, v4) or each frame scaled on its own (v7) lost
more in distribution. Without `--init` it trains from scratch. A CPU run
outlives a session: `--resume` goes on from its last checkpoint, bit for
bit.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smartscope.inference.events import (
    EVENT_FRAMES,
    WINDOW_PERCENTILES,
    mirror_views,
    normalise_window,
    pad_window,
)
from smartscope.training.common import UNet2d, export_onnx, fit, seed_everything
from smartscope.training.episodes import (
    FIELD_MARGIN_PX,
    MAX_DELAY_FRAMES,
    RANDOMISATION,
    SWITCH_FALSE_PER_MIN,
    TAIL_FRAMES,
    TARGET_SIGMA_PX,
    TILE_PX,
    VARIETY,
    crop_episode,
    evaluate,
    heatmap,
    held_out_episodes,
    random_microscope,
    randomised_episode,
    simulate_episode,
    window_length_scores,
)

# At run time the window's frames are at least this far apart (EventWindow): inside
# the training intervals, where the model sees a constriction change between frames.
WINDOW_SPACING_MS = 500.0
EPISODES = 2000  # simulated microscopes to train on (0.07 s each; 2000 x 30 frames of 64² is 1 GB)
EVAL_EPISODES = 96  # per set, about 740 events; sets of 96 differ by about ±0.02 in F1
# Share of training windows spaced as at run time (the rest: consecutive frames). 1.0 since
# the 5-frame model; 3-frame models scored alike at 0.5 and 1.0 (0.913 and 0.918, mean F1 of 4 sets).
KEYFRAME_WINDOWS = 1.0
# share of training episodes from RANDOMISATION (the rest: VARIETY); at 0.5 (v3, v4) the model lost
# 0.02-0.04 of in-distribution F1 against v2 and scored no better on the held-out world; at 0.1 (v11)
# it cleared the borders but the frame-rate policy imaged fewer events fast on its lower scores
RANDOMISED_EPISODES = 0.0
SHORT_WINDOWS = 0.25  # share of training windows with only 1-4 real frames (start of a stack)
MIN_WINDOW_FRAMES = 1  # the card's: the worker scores from the first frame of a stream
CHECKPOINT_EVERY = 500  # steps

METRICS_PROTOCOL = ("{episodes} fresh test episodes x 40 frames, each a new random microscope, run "
                    f"{TAIL_FRAMES} frames on (events that begin in those are not scored, objects are); maps "
                    "averaged over each window's 4 mirror views (mirror_views); detections "
                    "(peaks above threshold) linked over frames into objects within 5 px, an object "
                    "counting from its min_frames-th detection; an event is found if an object lies "
                    "on it while it is active; precision over objects; delay = confirmation frame - "
                    "first active frame; windows of keyframes window_spacing_ms apart, as the worker "
                    "builds them; false_per_min: false objects per minute imaged; threshold and "
                    f"min_frames: the best F1 with a median delay <= {MAX_DELAY_FRAMES} frames on "
                    "{episodes} other (validation) episodes, scored on the test ones "
                    "(validation_best: its validation score); switch_threshold (the frame-rate "
                    "policy's): the lowest threshold at min_frames with <= "
                    f"{SWITCH_FALSE_PER_MIN:g} false objects per minute on the validation episodes "
                    "(switch: its test score); windows from min_window_frames frames on (the oldest repeated)")


class EventNet(nn.Module):
    """2D U-Net 16-32-64: (B, frames, H, W) normalised window → (B, 1, H, W) event probability.
    Its 3x3 convolutions pad by reflection (no black frame around the field)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = UNet2d(EVENT_FRAMES, width)
        for m in self.backbone.modules():
            if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
                m.padding_mode = "reflect"
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.backbone(x)))


def _dataset(rng: np.random.Generator, episodes: int, frames: int) -> list[tuple[np.ndarray, list[np.ndarray], float]]:
    """Training episodes: (T, H, W) photons (float16: half the memory), events per frame, interval.
    RANDOMISED_EPISODES of them from RANDOMISATION, on fields FIELD_MARGIN_PX larger each side."""
    data = []
    for i in range(episodes):
        if rng.random() < RANDOMISED_EPISODES:
            frames_, events, interval = randomised_episode(rng, frames)
        else:
            scope, interval = random_microscope(rng)
            frames_, events = simulate_episode(scope, frames, interval)
        data.append((frames_.astype(np.float16), events, interval))
        if (i + 1) % max(1, episodes // 10) == 0:
            print(f"  simulated {i + 1}/{episodes} episodes", flush=True)
    return data


def _batch(rng: np.random.Generator, data, batch: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((batch, EVENT_FRAMES, TILE_PX, TILE_PX), np.float32)
    y = np.empty((batch, 1, TILE_PX, TILE_PX), np.float32)
    for b in range(batch):
        frames, events, interval_ms = data[rng.integers(len(data))]
        if frames.shape[1] > TILE_PX:  # a random crop of a larger field
            y0, x0 = rng.integers(frames.shape[1] - TILE_PX + 1), rng.integers(frames.shape[2] - TILE_PX + 1)
            frames, events = crop_episode(frames, events, y0, x0, TILE_PX)
        # as the worker's EventWindow builds it (keyframes WINDOW_SPACING_MS apart), or consecutive
        step = int(np.ceil(WINDOW_SPACING_MS / interval_ms - 1e-6)) if rng.random() < KEYFRAME_WINDOWS else 1
        real = int(rng.integers(1, EVENT_FRAMES)) if rng.random() < SHORT_WINDOWS else EVENT_FRAMES
        t = int(rng.integers(min((EVENT_FRAMES - 1) * step, len(frames) - 1), len(frames)))
        first = max(t - (real - 1) * step, t % step)
        window = pad_window(frames[first: t + 1: step].astype(np.float32), EVENT_FRAMES)
        win = normalise_window(window)
        target = heatmap(events[t][:, 1:], frames.shape[1:])
        k, flip = int(rng.integers(4)), bool(rng.integers(2))  # the physics has no preferred direction
        win, target = np.rot90(win, k, axes=(1, 2)), np.rot90(target, k)
        if flip:
            win, target = win[:, :, ::-1], target[:, ::-1]
        x[b], y[b, 0] = win, target
    return x, y


def load_onnx_weights(net: nn.Module, path: Path) -> None:
    """Initialise `net` from an exported EventNet (its ONNX initializers carry the state_dict's names)."""
    import onnx
    from onnx import numpy_helper

    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in onnx.load(str(path)).graph.initializer}
    net.load_state_dict({k: weights[k] for k in net.state_dict()})


def card_metrics(run: Callable[[np.ndarray], np.ndarray], seed: int, episodes: int = EVAL_EPISODES) -> dict[str, Any]:
    """The card's metrics of `run` (normalised (N, frames, H, W) windows → (N, 1, H, W) maps:
    the torch net in training, or the shipped ONNX session to re-score a card)
    on `episodes` held-out episodes of `seed` per set: with mirror views as at run
    time, and (one_view) without, for the cost trade; on VARIETY (in-distribution,
    as v2's card), with full windows only as well (as v2 was scored); on
    RANDOMISATION (the setting chosen on VARIETY's validation episodes); and what a
    short window costs (`window_length_scores`, on a quarter of the test episodes)."""
    held_out = held_out_episodes(seed, episodes=episodes)
    metrics = evaluate(mirror_views(run), held_out, spacing_ms=WINDOW_SPACING_MS, min_window_frames=MIN_WINDOW_FRAMES)
    one_view = evaluate(run, held_out, spacing_ms=WINDOW_SPACING_MS, min_window_frames=MIN_WINDOW_FRAMES)
    setting = ((metrics["best_threshold"],), (metrics["best_min_frames"],))
    full = evaluate(mirror_views(run), held_out, *setting, spacing_ms=WINDOW_SPACING_MS)
    randomised = evaluate(mirror_views(run), held_out_episodes(seed, episodes=episodes // 2, draw="randomised"),
                          *setting, spacing_ms=WINDOW_SPACING_MS, min_window_frames=MIN_WINDOW_FRAMES)
    short = window_length_scores(mirror_views(run), held_out["test"][: max(episodes // 4, 1)], WINDOW_SPACING_MS,
                                 metrics["best_threshold"])
    return {"protocol": METRICS_PROTOCOL.format(episodes=episodes), "eval_seed": seed, **metrics,
            "one_view": {k: one_view[k] for k in ("best_threshold", "best_min_frames", "best")},
            "full_windows_only": {"best": full["best"]},
            "randomised": {"episodes": episodes // 2, "best": randomised["best"]},
            "window_length": {"protocol": f"frame-level, single-frame detections at the card threshold, "
                              f"{max(episodes // 4, 1)} test episodes, the same frames for each window length "
                              "(oldest frame repeated)", **short}}


def train_and_export(seed: int = 0, out_dir: Path = Path("models"), steps: int | None = None,
                     batch: int = 16, log_every: int = 100, init: Path | None = None,
                     lr: float | None = None, resume: bool = False) -> dict[str, Any]:
    """Train (from scratch, or fine-tune from the EventNet ONNX `init`), score and export
    events.onnx and its card to `out_dir`. Every CHECKPOINT_EVERY steps: the weights
    (events-step<N>.pt, to score while it trains) and the whole state to go on from
    (events-checkpoint.pt). `resume`: go on from `out_dir`'s events-checkpoint.pt with
    its seed, steps, batch, lr and init (the same episodes, kept in events-dataset-seed<S>.pkl,
    or simulated again from the seed; the batch generator, optimizer and schedule
    restored), so a run spans sessions."""
    out_dir = Path(out_dir)
    checkpoint = out_dir / "events-checkpoint.pt"
    state = None
    if resume:
        state = torch.load(checkpoint, weights_only=False)
        seed, steps, batch, lr, init = (state["training"][k] for k in ("seed", "steps", "batch", "lr", "init"))
        print(f"resuming {checkpoint} after step {state['step']} of {steps}", flush=True)
    steps = steps or 6000
    lr = lr or (5e-4 if init else 2e-3)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / f"events-dataset-seed{seed}.pkl"  # the episodes, so a resume need not simulate them again
    if resume and cache.exists():
        with cache.open("rb") as f:
            data = pickle.load(f)
        print(f"loaded the training episodes from {cache}", flush=True)
    else:
        print("simulating training episodes…", flush=True)
        data = _dataset(rng, episodes=EPISODES, frames=30)
        print(f"simulated in {time.time() - t0:.0f}s", flush=True)
        with cache.with_suffix(".tmp").open("wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        cache.with_suffix(".tmp").replace(cache)
    net = EventNet()
    if state is not None:
        net.load_state_dict(state["state_dict"])
        rng.bit_generator.state = state["numpy_rng"]
    elif init is not None:
        load_onnx_weights(net, Path(init))
    training = {"seed": seed, "steps": steps, "batch": batch, "lr": lr, "init": str(init) if init else None}
    seconds_before = state["seconds"] if state is not None else 0.0

    def next_batch() -> tuple[torch.Tensor, ...]:
        x, y = _batch(rng, data, batch)
        return torch.from_numpy(x), torch.from_numpy(y)

    def save(step: int, opt: torch.optim.Optimizer, sched: object) -> None:
        if step % CHECKPOINT_EVERY and step != steps:
            return
        torch.save({"step": step, "state_dict": net.state_dict()}, out_dir / f"events-step{step}.pt")
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"step": step, "state_dict": net.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "numpy_rng": rng.bit_generator.state, "training": training,
                    "seconds": round(seconds_before + time.time() - t0, 1)}, tmp)
        tmp.replace(checkpoint)  # a run killed while saving keeps the previous checkpoint

    def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy(pred, target, weight=1 + 2 * target)

    fit(net, next_batch, loss_fn, steps, lr=lr, log_every=log_every, resume=state, after_step=save)
    return export_and_score(net, seed, out_dir, {"steps": steps, "batch": batch, "lr": lr, "init": init,
                                                 "seconds": round(seconds_before + time.time() - t0, 1)})


def score_checkpoint(path: Path, out_dir: Path, eval_episodes: int = EVAL_EPISODES) -> dict[str, Any]:
    """Export a training checkpoint (events-step<N>.pt) to `out_dir` as events.onnx and its card
    (card_metrics on `eval_episodes` per set: fewer to score a run while it trains), so
    `smartscope bench events` can score it before it ships."""
    torch.set_num_threads(1)
    state = torch.load(path, weights_only=False)
    net = EventNet()
    net.load_state_dict(state["state_dict"])
    return export_and_score(net, 0, out_dir, {"steps": state["step"], "checkpoint": str(path)},
                            eval_episodes=eval_episodes)


def export_and_score(net: EventNet, seed: int, out_dir: Path, training: dict[str, Any],
                     eval_seed: int | None = None, eval_episodes: int = EVAL_EPISODES) -> dict[str, Any]:
    """Score `net` on the held-out episodes (card_metrics, of `eval_seed`, default the training
    seed), export events.onnx and write its card."""
    net.eval()
    out_dir = Path(out_dir)
    steps, init = training["steps"], training.get("init")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    metrics = card_metrics(run, seed if eval_seed is None else eval_seed, eval_episodes)
    onnx_path = out_dir / "events.onnx"
    export_onnx(net, torch.zeros(1, EVENT_FRAMES, 64, 64), onnx_path, "window", "event_map")
    card = {
        "name": "events",
        # 12: v11 without the randomised episodes (shipped); 11: a tenth of the episodes randomised, fine-tuned
        # at lr 5e-4; 4: intervals to 15 s, constrictions to 90 s; 3: reflect padding, domain randomisation,
        # short windows; 2: 5 frames in (v2, shipped before v12); 1: 3
        "version": 12,
        "file": onnx_path.name,
        "task": "fission-event detection in live (iSIM-like) mitochondria imaging: per-pixel event probability",
        "architecture": f"2D U-Net 16-32-64 (reflect padding), causal window of {EVENT_FRAMES} frames as channels",
        "inputs": [{"name": "window", "shape": ["N", EVENT_FRAMES, "H", "W"], "dtype": "float32",
                    "description": f"frame t and {EVENT_FRAMES - 1} keyframes before it, window_spacing_ms apart, "
                                   "oldest first (any units; while fewer exist, from min_window_frames on, "
                                   "the oldest repeated in front), each window scaled from its "
                                   f"{WINDOW_PERCENTILES[0]:g}th to {WINDOW_PERCENTILES[1]:g}th percentile -> 0..1"}],
        "outputs": [{"name": "event_map", "shape": ["N", 1, "H", "W"],
                     "description": "probability that an event (constricting or dividing) is at this pixel in frame t"}],
        "normalisation": {"percentiles": list(WINDOW_PERCENTILES), "range": [0, 1]},
        "frames": EVENT_FRAMES,
        "window_spacing_ms": WINDOW_SPACING_MS,
        "min_window_frames": MIN_WINDOW_FRAMES,
        "mirror_views": True,  # run on the window and its 3 mirror images, maps averaged (card_run)
        "threshold": metrics["best_threshold"],
        "min_frames": metrics["best_min_frames"],
        "switch_threshold": metrics["switch_threshold"],
        "input_multiple_px": 4,
        "min_input_px": 16,
        "pixel_size_nm": None,
        "parameters": sum(q.numel() for q in net.parameters()),
        "training": {"seed": seed, **{k: (str(v) if isinstance(v, Path) else v) for k, v in training.items()},
                     "episodes": EPISODES, "frames_per_episode": 30, "tile_px": TILE_PX,
                     "target": f"Gaussian blobs, sigma {TARGET_SIGMA_PX} px",
                     "loss": "weighted BCE (1 + 2 x target)", "variety": VARIETY,
                     "randomisation": RANDOMISATION, "randomised_episodes": RANDOMISED_EPISODES,
                     "field_margin_px": FIELD_MARGIN_PX, "short_windows": SHORT_WINDOWS,
                     "augmentation": "rot90 and flips" + (", random crops of randomised fields"
                                                          if RANDOMISED_EPISODES else ""),
                     "keyframe_windows": KEYFRAME_WINDOWS, "torch": torch.__version__},
        "metrics": metrics,
        "retrain_command": f"smartscope train events --seed {seed}" + (f" --steps {steps}" if steps != 6000 else "")
                           + (f" --init {init}" if init else ""),
    }
    onnx_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return card
