"""An inference worker: pull frames over ZeroMQ, localize, push results back.

Run one per process (`smartscope worker --connect HOST`); several workers on
one or many machines share the frame stream (PUSH/PULL load-balances). A
malformed message is counted and dropped; the worker never dies of bad input.
It exits on SIGTERM/SIGINT or when `stop` is set.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time

import zmq

from collections import deque

import numpy as np

from smartscope.inference.counting import count_frame
from smartscope.inference.events import event_map, persistent_score
from smartscope.inference.localization import frame_to_photons, localize_photons
from smartscope.inference.session import load_model
from smartscope.transport.protocol import MalformedMessage, Result, decode_frame, encode_result

log = logging.getLogger("smartscope.worker")


def run_worker(frames_address: str, results_address: str, *, model: str | None, provider: str = "auto",
               threshold: float = 0.5, stop: threading.Event | None = None,
               threads: int | None = None, counting_model: str | None = None,
               event_model: str | None = None) -> dict[str, int]:
    """Serve until stopped; returns counts (frames, results, malformed, skipped).

    When frames arrive faster than the models run, the worker takes the
    newest waiting frame and skips the older ones (counted): a control loop
    needs fresh results more than complete ones, and storage keeps every
    frame for offline analysis anyway.

    The counting and event models look at a short causal window of frames:
    the worker keeps the last few frames it received and runs them when the
    window is consecutive (with several load-balanced workers, a worker sees
    consecutive frames only now and then: the other frames carry no count and
    no event score).
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    loaded = load_model(model, provider, threads=threads) if model else None
    counter = load_model(counting_model, provider, threads=threads) if counting_model else None
    eventer = load_model(event_model, provider, threads=threads) if event_model else None
    models = [m for m in (loaded, counter, eventer) if m is not None]
    if not models:
        raise ValueError("the worker has no model to run (localization, counting or event model)")
    window = max([m.card["frames"] for m in (counter, eventer) if m is not None], default=1)
    history: deque[tuple[int, np.ndarray]] = deque(maxlen=window)
    # event maps of the last frames (seq, map): the score needs an event seen in the card's min_frames frames
    recent_maps: deque[tuple[int, np.ndarray]] = deque(maxlen=max(eventer.card.get("min_frames", 1) - 1, 0)
                                                       if eventer else 0)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    name = "+".join(m.card["name"] for m in models)
    provider_used = models[0].provider
    log.info("worker %s: models %s on %s", worker_id, name, provider_used)

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 2)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(frames_address)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 64)
    push.setsockopt(zmq.LINGER, 500)
    push.connect(results_address)
    counts = {"frames": 0, "results": 0, "malformed": 0, "skipped": 0}

    def send(result: Result) -> None:
        try:
            push.send(encode_result(result), flags=zmq.NOBLOCK)
            counts["results"] += 1
        except zmq.Again:
            pass  # daemon gone or saturated: results are allowed to drop

    send(Result(kind="hello", worker_id=worker_id, provider=provider_used, model=name,
                t_done_s=time.time()))
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    try:
        while not stop.is_set():
            if not poller.poll(200):
                continue
            newest = None
            while True:  # every waiting message is checked; only the newest good frame is run
                parts = pull.recv_multipart(copy=False)
                counts["frames"] += 1
                try:
                    decoded = decode_frame(parts)
                except MalformedMessage as e:
                    counts["malformed"] += 1
                    log.warning("dropped malformed frame message (%d so far): %s", counts["malformed"], e)
                else:
                    counts["skipped"] += newest is not None
                    newest = decoded
                if not poller.poll(0):
                    break
            if newest is None:
                continue
            header, frame = newest
            t0 = time.perf_counter()
            photons = frame_to_photons(frame, header.camera)
            if loaded is not None:
                locs, background = localize_photons(loaded, photons, header.camera, threshold=threshold)
            else:  # e.g. live imaging: no single molecules to localize
                locs = np.zeros((0, 6))
                background = float(np.nanmedian(photons)) if np.isfinite(photons).any() else 0.0
            count = density = score = None
            history.append((header.seq, photons))
            seqs = [s for s, _ in history]
            if len(history) == window and seqs == list(range(seqs[0], seqs[0] + window)):
                frames_window = np.stack([p for _, p in history])
                if counter is not None:
                    count = int(count_frame(counter, frames_window[-counter.card["frames"]:]).sum())
                    density = count / (photons.size * (header.camera.pixel_size_nm / 1000) ** 2)
                if eventer is not None:
                    current = event_map(eventer, frames_window[-eventer.card["frames"]:])
                    # the maps of the immediately preceding frames this worker saw (fewer after skips)
                    recent = [m for k, m in recent_maps if header.seq - k <= recent_maps.maxlen]
                    score = persistent_score(current, recent)
                    if recent_maps.maxlen:
                        recent_maps.append((header.seq, current))
            infer_ms = (time.perf_counter() - t0) * 1000
            send(Result(seq=header.seq, t_capture_s=header.t_capture_s, t_done_s=time.time(),
                        worker_id=worker_id, provider=provider_used, model=name, infer_ms=infer_ms,
                        n_emitters=len(locs), localizations=[tuple(r) for r in locs.tolist()],
                        background_photons=background, count_estimate=count, density_per_um2=density,
                        event_score=score,
                        malformed_frames=counts["malformed"],
                        header=header))
    finally:
        pull.close()
        push.close()
    return counts
