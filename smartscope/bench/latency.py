"""Closed-loop latency: frame captured → inference result received by the engine.

The real daemon on the simulated microscope (real-time camera), one real
worker process running the shipped localization model, at several frame
rates; reports latency percentiles, the inference rate and the frames the
inference stream dropped (storage drops none).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from smartscope.config import load_config
from smartscope.service import Daemon


def run(quick: bool = False) -> dict:
    frames = 100 if quick else 400
    results = {}
    print(f"{'frame':>7} {'interval ms':>11} {'p50 ms':>7} {'p99 ms':>7} {'inferred/s':>10} {'dropped':>8} {'saved':>6}")
    for size, interval_ms in ((96, 50), (96, 20), (96, 10), (256, 20)):
        config = load_config()
        config.transport.frames_address = config.transport.results_address = "tcp://127.0.0.1:0"
        config.simulation.camera.width_px = config.simulation.camera.height_px = size
        config.acquisition.exposure_ms = config.acquisition.interval_ms = interval_ms
        config.policies = []  # latency of the data path alone
        daemon = Daemon(config)
        try:
            daemon.spawn_workers(1)
            daemon.wait_for_workers(1)
            with tempfile.TemporaryDirectory() as out:
                run_ = daemon.start_acquisition(Path(out), frames)
                run_.done.wait(600)
                s = run_.summary
        finally:
            daemon.close()
        key = f"{size}px@{interval_ms}ms"
        results[key] = {"latency_ms": s["latency_ms"], "inference_rate_hz": s["inference_rate_hz"],
                        "frames_dropped_inference": s["frames_dropped_inference"],
                        "frames_saved": s["frames_saved"], "frames_acquired": s["frames_acquired"]}
        print(f"{size:>7} {interval_ms:>11} {s['latency_ms']['p50']:>7} {s['latency_ms']['p99']:>7} "
              f"{s['inference_rate_hz']:>10} {s['frames_dropped_inference']:>8} {s['frames_saved']:>6}")
    return results
