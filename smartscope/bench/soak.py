"""A long run, as a lab leaves the daemon overnight: memory of the daemon and its workers over time, and
capture → result latency per 10 000 frames, so a leak or a slow drift shows as a number.

The demo as it ships (simulated microscope, 96 px at 20 ms, the policies on, one worker), for `frames`
frames (100 000 by default: about 35 min). The RSS growth is the slope of a straight line through the
samples after the first 10 % of the run (start-up, caches and the bounded windows filling), in MB/min.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path

import numpy as np

from smartscope.config import load_config
from smartscope.service import Daemon

BLOCK_FRAMES = 10_000
GOAL_GROWTH_MB_PER_MIN = 0.2
SAMPLE_S = 5.0


def _rss_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def _growth_mb_per_min(t_s: np.ndarray, rss_mb: np.ndarray) -> float | None:
    keep = t_s >= t_s[0] + 0.1 * (t_s[-1] - t_s[0])
    if keep.sum() < 3:
        return None
    return round(float(np.polyfit(t_s[keep] / 60, rss_mb[keep], 1)[0]), 3)


def _latency_blocks(inference_csv: Path) -> list[dict]:
    """p50 / p99 capture → result latency (ms) of each BLOCK_FRAMES frames."""
    with open(inference_csv, newline="") as fh:
        rows = [(int(r["frame"]), float(r["latency_ms"])) for r in csv.DictReader(fh)]
    blocks = []
    for start in range(0, (max(f for f, _ in rows) + 1) if rows else 0, BLOCK_FRAMES):
        lat = [ms for f, ms in rows if start <= f < start + BLOCK_FRAMES]
        if lat:
            p50, p99 = np.percentile(lat, [50, 99])
            blocks.append({"frames": f"{start}-{start + BLOCK_FRAMES - 1}", "inferred": len(lat),
                           "p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)})
    return blocks


def run(quick: bool = False, frames: int | None = None) -> dict:
    frames = frames or (5_000 if quick else 100_000)
    config = load_config()
    config.transport.frames_address = config.transport.results_address = "tcp://127.0.0.1:0"
    daemon = Daemon(config)
    samples: list[tuple[float, int, float, float]] = []  # (s, frames, daemon MB, workers MB)
    try:
        daemon.spawn_workers(1)
        daemon.wait_for_workers(1)
        with tempfile.TemporaryDirectory() as out:
            run_dir = Path(out) / "run"
            run = daemon.start_acquisition(run_dir, frames)
            t0 = time.time()
            print(f"{'min':>6} {'frames':>8} {'daemon MB':>10} {'workers MB':>11}")
            while True:
                if run.done.wait(SAMPLE_S):
                    break
                if run.state != "acquiring":
                    continue  # paused, or finishing: closing files and drawing the report is not the loop's memory
                workers_mb = sum(_rss_mb(p.pid) or 0.0 for p in daemon.pool.procs)
                samples.append((time.time() - t0, run.counts.acquired, _rss_mb(), workers_mb))
                if len(samples) % 12 == 1:
                    t, n, d, w = samples[-1]
                    print(f"{t / 60:>6.1f} {n:>8} {d:>10.1f} {w:>11.1f}", flush=True)
            summary = run.summary
            blocks = _latency_blocks(run_dir / "inference.csv")
    finally:
        daemon.close()
    t_s, _, daemon_mb, workers_mb = (np.array(c, dtype=float) for c in zip(*samples, strict=True))
    growth = {"daemon": _growth_mb_per_min(t_s, daemon_mb), "workers": _growth_mb_per_min(t_s, workers_mb)}
    p99 = [b["p99_ms"] for b in blocks]
    results = {
        "frames": frames, "minutes": round(t_s[-1] / 60, 2), "state": summary["state"],
        "frames_acquired": summary["frames_acquired"], "frames_saved": summary["frames_saved"],
        "frames_inferred": summary["frames_inferred"],
        "rss_mb": {"daemon_first": round(daemon_mb[0], 1), "daemon_last": round(daemon_mb[-1], 1),
                   "workers_first": round(workers_mb[0], 1), "workers_last": round(workers_mb[-1], 1)},
        "growth_mb_per_min": growth,
        "goal_growth_below_mb_per_min": GOAL_GROWTH_MB_PER_MIN,
        "latency_blocks": blocks,
        "p99_drift_ms": round(p99[-1] - p99[0], 2) if len(p99) > 1 else None,
        "samples": [{"s": round(t, 1), "frames": n, "daemon_mb": round(d, 1), "workers_mb": round(w, 1)}
                    for t, n, d, w in samples],
    }
    print("latency per block:", " ".join(f"{b['frames']}: {b['p50_ms']}/{b['p99_ms']}" for b in blocks))
    print(f"RSS growth after the first 10 %: daemon {growth['daemon']} MB/min, workers {growth['workers']} "
          f"MB/min (goal < {GOAL_GROWTH_MB_PER_MIN})")
    return results
