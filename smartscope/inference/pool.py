"""The inference workers as the daemon sees them: the processes it spawned and every worker it hears from.

Workers, spawned here or started by hand on other machines, announce themselves
on the results socket (hello, results, heartbeats, bye). `WorkerPool.track`
keeps one entry per worker from those messages and `status` says which are
active, silent or gone; the daemon calls `track` from its results thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartscope.inference.session import check_fits_frames, read_card
from smartscope.inference.worker import HEARTBEAT_S

if TYPE_CHECKING:
    from smartscope.config import InferenceConfig
    from smartscope.transport.protocol import Result

WORKER_FORGET_S = 600.0  # a worker gone or silent this long leaves the status


def worker_models(inference: InferenceConfig, frame_shape_px: tuple[int, int],
                  pixel_size_nm: float) -> dict[str, Path]:
    """Worker flag → model file, each checked against the frames; ValueError if no model is configured."""
    models = {}
    for flag, name in (("--model", inference.model), ("--counting-model", inference.counting_model),
                       ("--event-model", inference.event_model)):
        if name:
            path, card = read_card(name)
            check_fits_frames(card, frame_shape_px, pixel_size_nm)
            models[flag] = path
    if not models:
        raise ValueError("inference: no model configured (model, counting_model or event_model)")
    return models


class WorkerPool:
    def __init__(self, inference: InferenceConfig, models: dict[str, Path], frame_shape_px: tuple[int, int],
                 frames_address: str, results_address: str) -> None:
        self.inference = inference
        self.models = models
        self.frame_shape_px = frame_shape_px
        self.frames_address = frames_address
        self.results_address = results_address
        self.workers: dict[str, dict[str, Any]] = {}
        self.procs: list[subprocess.Popen] = []

    def spawn(self, n: int | None = None) -> None:
        """Start `n` worker processes on this host (default: inference.workers)."""
        inf = self.inference
        n = inf.workers if n is None else n
        threads = inf.threads_per_worker or max(1, (os.cpu_count() or 1) // max(n, 1))
        for _ in range(n):
            cmd = [sys.executable, "-m", "smartscope", "worker", "--frames-address", self.frames_address,
                   "--results-address", self.results_address, "--threads", str(threads),
                   "--warmup", "x".join(map(str, self.frame_shape_px)),
                   "--provider", inf.provider, "--threshold", str(inf.detection_threshold)]
            if inf.max_batch:
                cmd += ["--max-batch", str(inf.max_batch)]
            if inf.event_views == "one":
                cmd.append("--event-one-view")
            for flag, path in self.models.items():
                cmd += [flag, str(path)]
            if "--model" not in self.models:
                cmd.append("--no-localization")
            self.procs.append(subprocess.Popen(cmd))

    def wait(self, n: int, timeout_s: float = 60.0) -> None:
        """Until `n` workers are active; TimeoutError, or RuntimeError as soon as a spawned one exits."""
        deadline = time.time() + timeout_s
        while (active := sum(w["state"] == "active" for w in self.status().values())) < n:
            if time.time() > deadline:
                raise TimeoutError(f"{active}/{n} inference workers said hello in {timeout_s}s")
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("an inference worker exited at start (see its log above)")
            time.sleep(0.05)

    def track(self, r: Result, now_s: float) -> None:
        """Every message updates its worker's entry: what it runs, its counters, when it was last heard.

        The entry is replaced whole (readers in other threads never see half of one); workers gone or
        silent for WORKER_FORGET_S are forgotten.
        """
        old = self.workers.get(r.worker_id)
        if old is None:
            for worker_id, w in list(self.workers.items()):
                if now_s - w["last_seen_s"] > WORKER_FORGET_S:
                    self.workers.pop(worker_id, None)
        self.workers[r.worker_id] = {
            "host": r.host, "first_seen_s": old["first_seen_s"] if old else now_s,
            "results": (old["results"] if old else 0) + (r.kind == "result"),
            "provider": r.provider, "model": r.model, "threads": r.threads, "max_batch": r.max_batch,
            "last_seen_s": now_s, "frames_received": r.frames_received, "frames_skipped": r.frames_skipped,
            "malformed_frames": r.malformed, "said_bye": r.kind == "bye"}

    def status(self) -> dict[str, dict[str, Any]]:
        """Each worker heard from, with its state: active, silent (no message for 3 heartbeats) or gone (bye)."""
        now = time.time()
        out = {}
        for worker_id, w in list(self.workers.items()):
            state = "gone" if w["said_bye"] else "silent" if now - w["last_seen_s"] > 3 * HEARTBEAT_S else "active"
            out[worker_id] = {**w, "state": state}
        return out

    def stop(self) -> None:
        """Ask every spawned worker to exit (SIGTERM); kill one still running 5 s later."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
