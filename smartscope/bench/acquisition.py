"""What smartscope's acquisition costs over pymmcore-plus's own MDA runner.

A 256² time-lapse at interval 0 (hardware-sequenced bursts) on the simulated
camera, not paced in real time (frames come as fast as the simulation renders
them), run two ways on the same machine, alternately, `REPEATS` times:

- plain: `core.mda.run(sequence)` with no handler and no writer (the library's
  ceiling);
- smartscope: the daemon's whole acquisition path, through the same runner
  fed by the EventFeed: every frame stamped, written to OME-TIFF + frames.csv,
  and published to a worker-like receiver process over ZeroMQ (the frame ring
  on loopback), which takes each frame and gives its slot back.

Reported: frames/s of each (median over repeats), the ratio smartscope/plain
(median of the per-repeat ratios; goal ≥ 0.95), and the overhead per frame
in µs (1/rate − 1/plain rate).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import useq

from smartscope.bench.transport import _receiver
from smartscope.config import load_config
from smartscope.hardware import build_core
from smartscope.service import Daemon

SIZE_PX = 256
REPEATS = 5
GOAL_RATIO = 0.95


def _config(size_px: int):
    config = load_config()
    config.hardware.realtime = False
    config.simulation.camera.width_px = config.simulation.camera.height_px = size_px
    config.transport.frames_address = config.transport.results_address = "tcp://127.0.0.1:0"
    config.inference.workers = 0
    config.policies = []
    config.acquisition.burst_frames = 1000
    return config


def _sequence(frames: int) -> useq.MDASequence:
    return useq.MDASequence(time_plan={"interval": 0, "loops": frames})


def _plain(size_px: int, frames: int) -> float:
    core, _ = build_core(_config(size_px))
    seq = _sequence(frames)
    t0 = time.perf_counter()
    core.mda.run(seq)
    return frames / (time.perf_counter() - t0)


def _smartscope(size_px: int, frames: int) -> tuple[float, dict]:
    daemon = Daemon(_config(size_px))
    spawn = mp.get_context("spawn")
    ready, out = spawn.Event(), spawn.Queue()
    receiver = spawn.Process(target=_receiver, args=(daemon.frames_address, daemon.results_address, "ours",
                                                     frames, ready, out), daemon=True)
    receiver.start()
    try:
        ready.wait(30)
        time.sleep(0.2)  # the connection settles
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run = daemon.start_acquisition(Path(tmp) / "run", sequence=_sequence(frames))
            while run.counts.acquired < frames and not run.done.is_set():
                time.sleep(0.0005)
            rate = run.counts.acquired / (time.perf_counter() - t0)
            run.done.wait(120)
            s = run.summary
    finally:
        daemon.close()
        receiver.terminate()
    return rate, {k: s[k] for k in ("frames_acquired", "frames_saved", "frames_published", "frames_not_sent")}


def run(quick: bool = False) -> dict:
    frames = 300 if quick else 1000
    repeats = 3 if quick else REPEATS
    plain, ours, ratios, counts = [], [], [], []
    print(f"{SIZE_PX}² time-lapse at interval 0, {frames} frames, simulated camera not paced; {repeats} repeats")
    print(f"{'repeat':>6} {'plain fps':>10} {'smartscope fps':>15} {'ratio':>6}  saved/published/not sent")
    for i in range(repeats):
        p = _plain(SIZE_PX, frames)
        o, c = _smartscope(SIZE_PX, frames)
        plain.append(p)
        ours.append(o)
        ratios.append(o / p)
        counts.append(c)
        print(f"{i:>6} {p:>10.0f} {o:>15.0f} {o / p:>6.3f}  "
              f"{c['frames_saved']}/{c['frames_published']}/{c['frames_not_sent']}")
    p50_plain, p50_ours, ratio = statistics.median(plain), statistics.median(ours), statistics.median(ratios)
    overhead_us = (1 / p50_ours - 1 / p50_plain) * 1e6
    print(f"median: plain {p50_plain:.0f} frames/s, smartscope {p50_ours:.0f} frames/s, ratio {ratio:.3f} "
          f"(goal >= {GOAL_RATIO}), overhead {overhead_us:.0f} µs per frame")
    return {"size_px": SIZE_PX, "frames": frames, "repeats": repeats, "plain_fps": plain, "smartscope_fps": ours,
            "ratios": ratios, "median_plain_fps": p50_plain, "median_smartscope_fps": p50_ours,
            "median_ratio": ratio, "overhead_us_per_frame": overhead_us, "goal_ratio": GOAL_RATIO,
            "goal_met": ratio >= GOAL_RATIO, "counts": counts}
