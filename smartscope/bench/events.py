"""Fission-event detection, scored by event: precision, recall and F1 over a
threshold sweep, and the detection delay in frames after an event's first
active frame, and false objects per minute imaged (a 64x64 field). Fresh
episodes, each a new random microscope (see smartscope/training/episodes.py),
through the shipped ONNX model, with the window the worker builds; the
setting (threshold, min frames) is chosen on validation episodes and scored
on test ones."""

from __future__ import annotations

import time

import numpy as np

from smartscope.inference.events import card_run
from smartscope.inference.session import load_model
from smartscope.training.episodes import evaluate, held_out_episodes


def run(quick: bool = False) -> dict:
    model = load_model("events.onnx", "cpu")
    calls = []
    model_run = card_run(model)

    def timed_run(x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = model_run(x)
        calls.append(time.perf_counter() - t0)
        return out

    episodes, frames = (6, 30) if quick else (24, 40)
    result = evaluate(timed_run, held_out_episodes(seed=1, episodes=episodes, frames=frames),
                      spacing_ms=float(model.card.get("window_spacing_ms", 0.0)))
    print(f"{'threshold':>9} {'events':>6} {'found':>5} {'objects':>7} {'recall':>7} {'precision':>9} {'F1':>6} "
          f"{'delay (frames)':>14} {'false/min':>9}")
    for threshold, s in result["threshold_sweep"].items():
        print(f"{threshold:>9} {s['events']:>6} {s['found']:>5} {s['objects']:>7} {s['recall']:>7.3f} {s['precision']:>9.3f} "
              f"{s['f1']:>6.3f} {s['median_delay_frames'] if s['median_delay_frames'] is not None else '-':>14} "
              f"{s['false_per_min']:>9.2f}")
    result["card_threshold"] = model.card["threshold"]
    result["ms_per_frame_64px"] = round(1000 * float(np.median(calls)), 2)
    print(f"test F1 {result['best']['f1']:.3f} at {result['best_threshold']}/{result['best_min_frames']} "
          f"(threshold/min frames chosen on the validation episodes, where F1 {result['validation_best']['f1']:.3f}; "
          f"card: {result['card_threshold']}); {result['ms_per_frame_64px']} ms per 64x64 frame")
    return result
