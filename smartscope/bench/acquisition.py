"""What smartscope's acquisition costs over pymmcore-plus's own MDA runner.

A 256² time-lapse at interval 0 (hardware-sequenced bursts) on the simulated
camera, run two ways on the same machine, alternately, `REPEATS` times, in
two cases: the camera paced in real time at `PACED_EXPOSURE_MS` (does
smartscope keep up with a fast camera?), and not paced (frames as fast as the
simulation renders them: the camera is then CPU work in this process, and
every other thread competes with it on a 2-core machine):

- plain: `core.mda.run(sequence)` with no handler and no writer (the library's
  ceiling);
- smartscope: the daemon's whole acquisition path, through the same runner
  fed by the EventFeed: every frame stamped, written to OME-TIFF + frames.csv,
  and published to a worker-like receiver process over ZeroMQ (the frame ring
  on loopback), which takes each frame and gives its slot back.

Reported per case: frames/s of each from its first frame to its last
(median over repeats), the ratio smartscope/plain (median of the per-repeat
ratios; goal ≥ 0.95), the overhead per frame in wall-clock µs (1/rate −
1/plain rate) and in CPU µs of the acquiring process (the receiver's process
not counted), and the start-up: from the call that starts the run to its
first frame (the plan checked, the files and the sink set up).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

from smartscope.acquisition.plan import time_lapse
from smartscope.bench.transport import _receiver
from smartscope.config import load_config
from smartscope.hardware import build_core
from smartscope.service import Daemon
from smartscope.transport.keys import client_keys, local_worker_key_files

SIZE_PX = 256
REPEATS = 5
GOAL_RATIO = 0.95
PACED_EXPOSURE_MS = 2.5  # 400 frames/s
CASES = {"paced": True, "unpaced": False}


def _config(size_px: int, paced: bool):
    config = load_config()
    config.hardware.realtime = paced
    config.acquisition.exposure_ms = PACED_EXPOSURE_MS
    config.simulation.camera.width_px = config.simulation.camera.height_px = size_px
    config.transport.frames_address = config.transport.results_address = "tcp://127.0.0.1:0"
    config.inference.workers = 0
    config.inference.require_workers = False  # the bench's receiver stands in for a worker
    config.policies = []
    config.acquisition.burst_frames = 1000
    return config


class _Clock:
    """Times of the first and last frame (a listener on frameReady costs nothing next to a frame)."""

    def __init__(self) -> None:
        self.first_s = self.last_s = 0.0
        self.n = 0

    def frameReady(self, *_args) -> None:  # noqa: N802
        self.last_s = time.perf_counter()
        if self.n == 0:
            self.first_s = self.last_s
        self.n += 1

    def rate(self) -> float:
        return (self.n - 1) / (self.last_s - self.first_s)


def _plain(size_px: int, frames: int, paced: bool) -> tuple[float, float, float]:
    """(frames/s, CPU s per frame, start-up s)."""
    core, _ = build_core(_config(size_px, paced))
    seq = time_lapse(frames, 0)
    clock = _Clock()
    core.mda.events.frameReady.connect(clock.frameReady)
    t0, cpu0 = time.perf_counter(), time.process_time()
    core.mda.run(seq)
    return clock.rate(), (time.process_time() - cpu0) / frames, clock.first_s - t0


def _smartscope(size_px: int, frames: int, paced: bool) -> tuple[float, float, float, dict]:
    """(frames/s, CPU s per frame, start-up s, counts)."""
    config = _config(size_px, paced)
    daemon = Daemon(config)
    keys = client_keys(*local_worker_key_files(config.transport.resolved_keys_dir()))
    clock = _Clock()
    daemon.core.mda.events.frameReady.connect(clock.frameReady)
    spawn = mp.get_context("spawn")
    ready, out = spawn.Event(), spawn.Queue()
    receiver = spawn.Process(target=_receiver, args=(daemon.frames_address, daemon.results_address, "ours",
                                                     frames, ready, out, keys), daemon=True)
    receiver.start()
    try:
        ready.wait(30)
        time.sleep(0.2)  # the connection settles
        with tempfile.TemporaryDirectory() as tmp:
            t0, cpu0 = time.perf_counter(), time.process_time()
            run = daemon.start_acquisition(Path(tmp) / "run", sequence=time_lapse(frames, 0))
            while run.counts.acquired < frames and not run.done.is_set():
                time.sleep(0.002)
            cpu_s = (time.process_time() - cpu0) / frames
            run.done.wait(120)
            s = run.summary
    finally:
        daemon.close()
        receiver.terminate()
    return clock.rate(), cpu_s, clock.first_s - t0, {k: s[k] for k in ("frames_acquired", "frames_saved", "frames_published", "frames_not_sent")}


def _case(paced: bool, frames: int, repeats: int) -> dict:
    plain, ours, ratios, cpu_plain, cpu_ours, start_plain, start_ours, counts = [], [], [], [], [], [], [], []
    print(f"{'repeat':>6} {'plain fps':>10} {'smartscope fps':>15} {'ratio':>6} {'CPU µs/frame':>15} "
          f"{'start-up ms':>13}  saved/published/not sent")
    for i in range(repeats):
        p, p_cpu, p_start = _plain(SIZE_PX, frames, paced)
        o, o_cpu, o_start, c = _smartscope(SIZE_PX, frames, paced)
        start_plain.append(p_start * 1000)
        start_ours.append(o_start * 1000)
        plain.append(p)
        ours.append(o)
        ratios.append(o / p)
        cpu_plain.append(p_cpu * 1e6)
        cpu_ours.append(o_cpu * 1e6)
        counts.append(c)
        print(f"{i:>6} {p:>10.0f} {o:>15.0f} {o / p:>6.3f} {p_cpu * 1e6:>6.0f} / {o_cpu * 1e6:<6.0f} "
              f"{p_start * 1000:>5.0f} / {o_start * 1000:<5.0f}  "
              f"{c['frames_saved']}/{c['frames_published']}/{c['frames_not_sent']}")
    p50_plain, p50_ours, ratio = statistics.median(plain), statistics.median(ours), statistics.median(ratios)
    overhead_us = (1 / p50_ours - 1 / p50_plain) * 1e6
    cpu_overhead_us = statistics.median(cpu_ours) - statistics.median(cpu_plain)
    print(f"median: plain {p50_plain:.0f} frames/s, smartscope {p50_ours:.0f} frames/s, ratio {ratio:.3f} "
          f"(goal >= {GOAL_RATIO}); overhead {overhead_us:.0f} µs wall, {cpu_overhead_us:.0f} µs CPU per frame; "
          f"start-up {statistics.median(start_plain):.0f} / {statistics.median(start_ours):.0f} ms")
    return {"plain_fps": plain, "smartscope_fps": ours, "ratios": ratios, "cpu_us_per_frame_plain": cpu_plain,
            "cpu_us_per_frame_smartscope": cpu_ours, "startup_ms_plain": start_plain, "startup_ms_smartscope": start_ours,
            "median_plain_fps": p50_plain, "median_smartscope_fps": p50_ours,
            "median_ratio": ratio, "overhead_us_per_frame": overhead_us, "cpu_overhead_us_per_frame": cpu_overhead_us,
            "goal_met": ratio >= GOAL_RATIO, "counts": counts}


def run(quick: bool = False) -> dict:
    frames = 300 if quick else 1000
    repeats = 3 if quick else REPEATS
    results: dict = {"size_px": SIZE_PX, "frames": frames, "repeats": repeats, "goal_ratio": GOAL_RATIO,
                     "paced_exposure_ms": PACED_EXPOSURE_MS}
    for name, paced in CASES.items():
        how = f"paced at {PACED_EXPOSURE_MS} ms" if paced else "not paced"
        print(f"{SIZE_PX}² time-lapse at interval 0, {frames} frames, simulated camera {how}; {repeats} repeats")
        results[name] = _case(paced, frames, repeats)
    return results
