"""An inference worker: pull frames over ZeroMQ, run the models, push results back.

Run one per process (`smartscope worker --connect HOST`); several workers on
one or many machines share the frame stream (PUSH/PULL load-balances). Each
announces itself (hello: host, provider, models, threads), sends a heartbeat
while idle and says bye at exit, so the daemon can show every worker in its
status. A malformed message is counted per reason and dropped; the worker
never dies of bad input. It exits on SIGTERM/SIGINT or when `stop` is set.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
import zmq

from smartscope.inference.counting import count_frame
from smartscope.inference.events import event_map, persistent_score
from smartscope.inference.localization import frame_to_photons, maps_to_localizations, prepare_input
from smartscope.inference.session import LoadedModel, load_model
from smartscope.transport.protocol import FrameHeader, MalformedMessage, Result, StageTimes, decode_frame, encode_result
from smartscope.transport.ring import RingReader

log = logging.getLogger("smartscope.worker")

HEARTBEAT_S = 2.0  # an idle worker says it is alive this often


@dataclass
class _Frame:
    """A frame taken off the socket, ready for the models."""

    header: FrameHeader
    photons: np.ndarray
    t_received_s: float
    pre_ms: float


def run_worker(frames_address: str, results_address: str, *, model: str | None, provider: str = "auto",
               threshold: float = 0.5, stop: threading.Event | None = None,
               threads: int | None = None, counting_model: str | None = None,
               event_model: str | None = None, max_batch: int | None = None,
               warmup_shape: tuple[int, int] | None = None) -> dict[str, int]:
    """Serve until stopped; returns counts (frames, results, skipped, malformed).

    When frames arrive faster than the models run, the worker conflates: it
    keeps the newest waiting frames (up to `max_batch`, run as one batch) and
    skips the older ones, counted and reported by sequence number. A control
    loop needs fresh results more than complete ones, and storage keeps every
    frame for offline analysis anyway. Conflating on the worker (rather than
    dropping the oldest in the daemon) keeps the daemon's send path one
    non-blocking call, and a worker that is behind sees the newest frame at once.
    `max_batch` defaults to 1 on CPU (a batch costs as much per frame and delays
    the newest) and 8 on GPU (where batching is what makes it keep up).

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
    provider_used = models[0].provider
    if max_batch is None:
        max_batch = 1 if provider_used == "CPUExecutionProvider" else 8
    if loaded is None or not loaded.batches:
        max_batch = 1
    if warmup_shape is not None:  # the first real frame must not pay for ORT's first-run set-up
        for m in models:
            m.warm_up(warmup_shape)
    window = max([m.card["frames"] for m in (counter, eventer) if m is not None], default=1)
    history: deque[tuple[int, np.ndarray]] = deque(maxlen=window)
    # event maps of the last frames (seq, map): the score needs an event seen in the card's min_frames frames
    recent_maps: deque[tuple[int, np.ndarray]] = deque(maxlen=max(eventer.card.get("min_frames", 1) - 1, 0)
                                                       if eventer else 0)
    host = socket.gethostname()
    worker_id = f"{host}:{os.getpid()}"
    name = "+".join(m.card["name"] for m in models)
    log.info("worker %s: models %s on %s, %s threads, batches up to %d", worker_id, name, provider_used,
             threads or "default", max_batch)

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, max(2, max_batch))  # enough waiting frames to fill a batch
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(frames_address)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 64)
    push.setsockopt(zmq.LINGER, 500)
    push.connect(results_address)
    ring = RingReader()
    counts = {"frames": 0, "results": 0, "skipped": 0}
    malformed: Counter[str] = Counter()
    last_sent = [0.0]

    def send(kind: str, **fields) -> None:
        message = Result(kind=kind, worker_id=worker_id, host=host, provider=provider_used, model=name,
                         threads=threads, max_batch=max_batch, t_done_s=time.time(),
                         frames_received=counts["frames"], frames_skipped=counts["skipped"],
                         malformed=dict(malformed), **fields)
        try:
            push.send(encode_result(message), flags=zmq.NOBLOCK)
            counts["results"] += kind == "result"
            last_sent[0] = time.monotonic()
        except zmq.Again:
            pass  # daemon gone or saturated: results are allowed to drop

    def receive_waiting() -> tuple[list[tuple[FrameHeader, np.ndarray | None, float]], list[tuple[int, int]],
                                   list[int]]:
        """Every message waiting now, decoded: (newest max_batch frames, ring releases and seqs of the rest)."""
        frames, releases = [], []
        while True:
            parts = pull.recv_multipart(copy=False)
            t_received_s = time.time()
            counts["frames"] += 1
            try:
                header, pixels = decode_frame(parts)
            except MalformedMessage as e:
                malformed[e.reason] += 1
                log.warning("dropped malformed frame message (%d so far): %s", sum(malformed.values()), e)
            else:
                frames.append((header, pixels, t_received_s))
            if not poller.poll(0):
                break
        skipped = frames[:-max_batch]
        counts["skipped"] += len(skipped)
        releases += [(h.ring.slot, h.ring.gen) for h, _, _ in skipped if h.ring is not None]
        return frames[-max_batch:], releases, [h.seq for h, _, _ in skipped]

    def preprocess(header: FrameHeader, pixels: np.ndarray | None, t_received_s: float) -> _Frame | None:
        """ADU → photons (a copy: a ring slot is free again after this)."""
        t0 = time.perf_counter()
        try:
            if header.ring is not None:
                pixels = ring.view(header.ring, header.shape, header.dtype)
            photons = frame_to_photons(pixels, header.camera)
            if header.ring is not None and not ring.current(header.ring):
                raise MalformedMessage("ring", f"slot {header.ring.slot} was reclaimed while it was read")
        except MalformedMessage as e:
            malformed[e.reason] += 1
            log.warning("dropped frame %d: %s", header.seq, e)
            return None
        return _Frame(header, photons, t_received_s, (time.perf_counter() - t0) * 1000)

    send("hello")
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    try:
        while not stop.is_set():
            if not poller.poll(200):
                if time.monotonic() - last_sent[0] > HEARTBEAT_S:
                    send("heartbeat")
                continue
            waiting, releases, skipped_seqs = receive_waiting()
            batch = [f for f in (preprocess(*w) for w in waiting) if f is not None]
            releases += [(h.ring.slot, h.ring.gen) for h, _, _ in waiting if h.ring is not None]
            if releases or skipped_seqs:
                send("release", released=releases, skipped_seqs=skipped_seqs)
            if batch:
                for result in _infer(batch, loaded, counter, eventer, threshold, history, recent_maps, window):
                    send("result", **result)
    finally:
        send("bye")
        pull.close()
        push.close()
        ring.close()
    return {**counts, "malformed": sum(malformed.values()), **{f"malformed_{k}": v for k, v in malformed.items()}}


def _infer(batch: list[_Frame], loaded: LoadedModel | None, counter: LoadedModel | None,
           eventer: LoadedModel | None, threshold: float, history: deque, recent_maps: deque,
           window: int) -> list[dict]:
    """Run the models on a batch of frames (oldest first); one result's fields per frame."""
    t0 = time.perf_counter()
    per_frame_locs: list[tuple[np.ndarray, float]] = []
    infer_ms = post_ms = 0.0
    if loaded is not None:
        inputs = [prepare_input(f.photons, loaded.card) for f in batch]
        t1 = time.perf_counter()
        maps = loaded.run(np.concatenate([x for x, _ in inputs]))
        t2 = time.perf_counter()
        for i, (f, (_, shape)) in enumerate(zip(batch, inputs, strict=True)):
            per_frame_locs.append(maps_to_localizations(loaded.card, maps[i:i + 1], f.photons, shape,
                                                        f.header.camera, threshold=threshold))
        post_ms = (time.perf_counter() - t2) * 1000
        infer_ms = (t2 - t1) * 1000
        pre_batch_ms = (t1 - t0) * 1000
    else:  # e.g. live imaging: no single molecules to localize
        pre_batch_ms = 0.0
        for f in batch:
            finite = np.isfinite(f.photons).any()
            per_frame_locs.append((np.zeros((0, 6)), float(np.nanmedian(f.photons)) if finite else 0.0))
    results = []
    for f, (locs, background) in zip(batch, per_frame_locs, strict=True):
        h = f.header
        t3 = time.perf_counter()
        count = density = score = None
        history.append((h.seq, f.photons))
        seqs = [s for s, _ in history]
        if len(history) == window and seqs == list(range(seqs[0], seqs[0] + window)):
            frames_window = np.stack([p for _, p in history])
            if counter is not None:
                count = int(count_frame(counter, frames_window[-counter.card["frames"]:]).sum())
                density = count / (f.photons.size * (h.camera.pixel_size_nm / 1000) ** 2)
            if eventer is not None:
                current = event_map(eventer, frames_window[-eventer.card["frames"]:])
                # the maps of the immediately preceding frames this worker saw (fewer after skips)
                recent = [m for k, m in recent_maps if h.seq - k <= recent_maps.maxlen]
                score = persistent_score(current, recent)
                if recent_maps.maxlen:
                    recent_maps.append((h.seq, current))
        window_ms = (time.perf_counter() - t3) * 1000  # counting/event models: pre + inference + post
        stages = StageTimes(t_received_s=f.t_received_s, pre_ms=f.pre_ms + pre_batch_ms / len(batch),
                            infer_ms=infer_ms / len(batch) + window_ms, post_ms=post_ms / len(batch),
                            batch=len(batch))
        results.append({"seq": h.seq, "t_capture_s": h.t_capture_s, "header": h, "stages": stages,
                        "infer_ms": stages.pre_ms + stages.infer_ms + stages.post_ms,
                        "n_emitters": len(locs), "localizations": [tuple(r) for r in locs.tolist()],
                        "background_photons": background, "count_estimate": count, "density_per_um2": density,
                        "event_score": score})
    return results
