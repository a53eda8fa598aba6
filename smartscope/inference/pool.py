"""The inference workers as the daemon sees them: the processes it spawned and every worker it hears from.

Workers, spawned here or started by hand on other machines, announce themselves
on the results socket (hello, results, heartbeats, bye). `WorkerPool.track`
keeps one entry per worker from those messages and `status` says which are
active, silent or gone; the daemon calls `track` from its results thread.

The pool supervises the workers it spawned (`supervise`, called by the results
thread several times a second): one that exits is logged with its exit status,
reaped (no zombie), marked gone and started again after a back-off that
doubles with each failure in a row (RESPAWN_BACKOFF_S), up to
`inference.max_respawns` in a row; a respawned worker that says hello resets
the count. Spawned workers also watch the daemon (`--parent-pid`) and exit
within a second when it is gone, however it died.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartscope.inference.events import outside_training
from smartscope.inference.session import check_fits_frames, read_card, with_psf_calibration
from smartscope.inference.worker import HEARTBEAT_S

if TYPE_CHECKING:
    from smartscope.config import InferenceConfig
    from smartscope.transport.protocol import Result

log = logging.getLogger("smartscope")

WORKER_FORGET_S = 600.0  # a worker gone or silent this long leaves the status
MAX_WORKERS_TRACKED = 256  # more distinct workers than this: the oldest silent ones are forgotten first
RESPAWN_BACKOFF_S = (0.5, 30.0)  # first wait before a respawn, and the longest


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def worker_models(inference: InferenceConfig, frame_shape_px: tuple[int, int],
                  pixel_size_nm: float) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Worker flag → model file, each checked against the frames, and each model's card by its
    `inference` field (model, counting_model, event_model: the policies take defaults from them);
    ValueError if no model is configured. An event model used at a pixel size outside its training
    draw is logged as a warning (`outside_training`)."""
    models, cards = {}, {}
    for flag, field in (("--model", "model"), ("--counting-model", "counting_model"),
                        ("--event-model", "event_model")):
        if name := getattr(inference, field):
            path, card = read_card(name, inference.provider)  # `auto` resolves for the workers' provider
            if flag == "--model" and inference.psf_calibration:
                card = with_psf_calibration(card, inference.psf_calibration)
            check_fits_frames(card, frame_shape_px, pixel_size_nm)
            if field == "event_model":
                for warning in outside_training(card, pixel_size_nm):
                    log.warning("%s: its scores there are not measured", warning)
            models[flag], cards[field] = path, card
    if not models:
        raise ValueError("inference: no model configured (model, counting_model or event_model)")
    return models, cards


class WorkerPool:
    def __init__(self, inference: InferenceConfig, models: dict[str, Path], frame_shape_px: tuple[int, int],
                 frames_address: str, results_address: str, key_args: tuple[str, ...] = ()) -> None:
        self.inference = inference
        self.models = models
        self.frame_shape_px = frame_shape_px
        self.frames_address = frames_address
        self.results_address = results_address
        self.key_args = key_args  # CURVE key flags for spawned workers (transport.auth)
        self.workers: dict[str, dict[str, Any]] = {}
        self.procs: list[subprocess.Popen] = []
        self.exits: list[dict[str, Any]] = []  # every spawned worker that exited, newest last (bounded)
        self.respawns = 0
        self._failures_in_row = 0
        self._respawn_at_s: float | None = None
        self._wanted = 0  # spawned workers the pool keeps alive
        self._threads = 1
        self._closing = False
        self._host = socket.gethostname()

    def spawn(self, n: int | None = None) -> None:
        """Start `n` worker processes on this host (default: inference.workers), kept alive by `supervise`."""
        inf = self.inference
        n = inf.workers if n is None else n
        self._wanted += n
        self._threads = inf.threads_per_worker or max(1, (os.cpu_count() or 1) // max(self._wanted, 1))
        for _ in range(n):
            self._start_one()

    def _start_one(self) -> None:
        inf = self.inference
        cmd = [sys.executable, "-m", "smartscope", "worker", "--frames-address", self.frames_address,
               "--results-address", self.results_address, "--threads", str(self._threads),
               "--warmup", "x".join(map(str, self.frame_shape_px)),
               "--provider", inf.provider, "--threshold", str(inf.detection_threshold),
               "--parent-pid", str(os.getpid()), *self.key_args]
        if inf.max_batch:
            cmd += ["--max-batch", str(inf.max_batch)]
        if inf.psf_calibration and "--model" in self.models:
            cmd += ["--psf-calibration", inf.psf_calibration]
        if inf.event_views == "one":
            cmd.append("--event-one-view")
        for flag, path in self.models.items():
            cmd += [flag, str(path)]
        if "--model" not in self.models:
            cmd.append("--no-localization")
        self.procs.append(subprocess.Popen(cmd))

    def supervise(self, now_s: float) -> None:
        """Reap spawned workers that exited (logged, marked gone) and start new ones after a back-off."""
        if self._closing:
            return
        for p in [p for p in self.procs if p.poll() is not None]:
            self.procs.remove(p)
            reason = _exit_reason(p.returncode)
            worker_id = f"{self._host}:{p.pid}"
            if worker_id in self.workers:
                self.workers[worker_id] = {**self.workers[worker_id], "said_bye": True, "exit": reason}
            self.exits = [*self.exits[-99:], {"worker": worker_id, "pid": p.pid, "t_s": now_s, "reason": reason}]
            self._failures_in_row += 1
            limit = self.inference.max_respawns
            if self._failures_in_row > limit:
                log.error("inference worker %s %s; not started again (%d failures in a row > "
                          "inference.max_respawns %d)", worker_id, reason, self._failures_in_row, limit)
                continue
            lo, hi = RESPAWN_BACKOFF_S
            wait_s = min(hi, lo * 2 ** (self._failures_in_row - 1))
            log.error("inference worker %s %s; starting another in %.1f s", worker_id, reason, wait_s)
            self._respawn_at_s = now_s + wait_s if self._respawn_at_s is None else self._respawn_at_s
        if self._respawn_at_s is not None and now_s >= self._respawn_at_s:
            self._respawn_at_s = None
            for _ in range(self._wanted - len(self.procs)):
                self._start_one()
                self.respawns += 1

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
            while len(self.workers) >= MAX_WORKERS_TRACKED:  # the least recently heard goes first
                self.workers.pop(min(self.workers, key=lambda k: self.workers[k]["last_seen_s"]))
            if r.host == self._host and any(p.pid == _pid(r.worker_id) for p in self.procs):
                self._failures_in_row = 0  # one of ours started: the back-off starts over
        elif old.get("exit"):
            return  # a late message of a worker already reaped
        self.workers[r.worker_id] = {
            "host": r.host, "first_seen_s": old["first_seen_s"] if old else now_s,
            "results": (old["results"] if old else 0) + (r.kind == "result"),
            "provider": r.provider, "model": r.model, "threads": r.threads, "max_batch": r.max_batch,
            "last_seen_s": now_s, "frames_received": r.frames_received, "frames_skipped": r.frames_skipped,
            "malformed_frames": r.malformed, "said_bye": r.kind == "bye", "exit": None}

    def status(self) -> dict[str, dict[str, Any]]:
        """Each worker heard from, with its state: active, silent (no message for 3 heartbeats) or gone (bye)."""
        now = time.time()
        out = {}
        for worker_id, w in list(self.workers.items()):
            state = "gone" if w["said_bye"] else "silent" if now - w["last_seen_s"] > 3 * HEARTBEAT_S else "active"
            out[worker_id] = {**w, "state": state}
        return out

    def stop(self) -> None:
        """Ask every spawned worker to exit (SIGTERM); kill one still running 5 s later. No respawn after."""
        self._closing = True
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def _pid(worker_id: str) -> int | None:
    """The process id in a worker id (host:pid), None if it has none."""
    tail = worker_id.rpartition(":")[2]
    return int(tail) if tail.isdigit() else None
