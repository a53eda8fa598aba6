"""An inference worker: ask for frames over ZeroMQ, run the models, push results back.

Run one per process (`smartscope worker --connect HOST`); several workers on
one or many machines share the frame stream: each asks for a frame (a READY
credit) when it is free, and the daemon sends its newest frame to a worker
that asked (transport/sockets.py FramePublisher), so no frame waits behind a
busy worker. Each
announces itself (hello: host, provider, models, threads), sends a heartbeat
while idle and says bye at exit, so the daemon can show every worker in its
status. A malformed message is counted per reason and dropped; the worker
never dies of bad input. It exits on SIGTERM/SIGINT or when `stop` is set,
and a worker the daemon spawned (`parent_pid`) exits within a second of the
daemon's death, however it died. With `keys` both sockets are CURVE clients of
the daemon (transport/keys.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import zmq

from smartscope.inference.counting import count_frame
from smartscope.inference.events import EventWindow, event_map, event_window_for, persistent_score, previous_maps_for
from smartscope.inference.localization import frame_to_photons, maps_to_localizations, prepare_frame, window_input
from smartscope.inference.session import LoadedModel, load_model
from smartscope.inference.tiling import decode_tile, tile_of
from smartscope.transport.keys import ClientKeys, connect_curve
from smartscope.transport.protocol import (
    LOCALIZATION_COLUMNS,
    FrameHeader,
    MalformedMessage,
    Result,
    StageTimes,
    decode_frame,
    encode_ready,
    encode_result,
)
from smartscope.transport.ring import RingReader

log = logging.getLogger("smartscope.worker")

HEARTBEAT_S = 2.0  # a worker that sent nothing for this long says it is alive
ASK_AGAIN_S = 1.0  # an idle worker repeats its request for frames (a restarted daemon never heard the first)
MAX_FRAME_BYTES = 256 << 20  # larger frame messages are cut off by ZeroMQ (a 4096² float32 frame is 64 MiB)


@dataclass
class _Frame:
    """A frame taken off the socket, ready for the models."""

    header: FrameHeader
    photons: np.ndarray
    t_received_s: float
    pre_ms: float
    prepared: np.ndarray | None = None  # the localization model's input for it (prepare_frame)


def run_worker(frames_address: str, results_address: str, *, model: str | None, provider: str = "auto",
               threshold: float = 0.5, stop: threading.Event | None = None,
               threads: int | None = None, counting_model: str | None = None,
               event_model: str | None = None, event_one_view: bool = False, max_batch: int | None = None,
               warmup_shape: tuple[int, int] | None = None, keys: ClientKeys | None = None,
               parent_pid: int | None = None, psf_calibration: str | None = None) -> dict[str, int]:
    """Serve until stopped; returns counts (frames, results, skipped, malformed).

    The worker asks for `max_batch` frames whenever it is free (at start, as
    soon as a batch's inference is done, and again every second while idle, so a
    restarted daemon hears it): a frame arrives only when the worker can run it
    at once. A control loop needs fresh results more than complete ones, and
    storage keeps every frame for offline analysis anyway. Should more frames
    arrive than it asked for (a repeated request crossing a frame), it keeps
    the newest `max_batch` and skips the older ones, counted and reported by
    sequence number. `max_batch` defaults to 1 on CPU (a batch costs as much
    per frame and delays the newest) and 8 on GPU (where batching is what makes
    it keep up; a result is then up to 8 frame intervals old).

    The localization and counting models look at a short causal window of
    frames: the worker keeps the last few frames it received. The counting
    model runs only when its window is consecutive (with several load-balanced
    workers, a worker sees consecutive frames only now and then: the other
    frames carry no count); the localization model runs on every frame, with
    copies standing in for the earlier frames it did not see (it was trained
    so, and localizes one frame alone as well: see its card). The event
    model's window is its keyframes, `window_spacing_ms` apart by capture time
    (`EventWindow`), so it sees change at any frame rate; it runs as its card
    measured it (with mirror views), or on the window alone with
    `event_one_view`. A tile of a larger frame (its header's TilePart) is
    prepared with the whole frame's statistics, keeps a window of its own
    (one stream per tile), and its result lists only what its core owns,
    each with the whole-frame pixel it was found at, for the daemon's merge.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    loaded = load_model(model, provider, threads=threads, psf_calibration=psf_calibration) if model else None
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
    streams = Streams(
        window_frames=max([int(m.card.get("frames", 1)) for m in (loaded, counter) if m is not None], default=1),
        event_card=eventer.card if eventer else None)
    host = socket.gethostname()
    worker_id = f"{host}:{os.getpid()}"
    name = "+".join(m.card["name"] for m in models)
    log.info("worker %s: models %s on %s, %s threads, batches up to %d", worker_id, name, provider_used,
             threads or "default", max_batch)

    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.DEALER)  # frames in; READY requests out
    pull.setsockopt(zmq.RCVHWM, max(2, max_batch))  # enough waiting frames to fill a batch
    pull.setsockopt(zmq.SNDHWM, 4)
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 64)
    push.setsockopt(zmq.LINGER, 500)
    if keys is not None:
        connect_curve(pull, keys)
        connect_curve(push, keys)
    pull.connect(frames_address)
    push.connect(results_address)
    ring = RingReader()
    counts = {"frames": 0, "results": 0, "skipped": 0}
    malformed: Counter[str] = Counter()
    last_sent = [0.0]
    last_asked = [0.0]
    requests = [0]  # this worker's requests for frames so far (a repeat keeps the number)
    # ring slots to give back and frames done with without a result: they ride on the next message
    # that leaves, so a message the socket refuses loses no release
    pending: dict[str, list] = {"released": [], "skipped": []}

    def send(kind: str, **fields) -> None:
        message = Result(kind=kind, worker_id=worker_id, host=host, provider=provider_used, model=name,
                         threads=threads, max_batch=max_batch, t_done_s=time.time(),
                         frames_received=counts["frames"], frames_skipped=counts["skipped"],
                         malformed=dict(malformed), **pending, **fields)
        try:
            push.send(encode_result(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            return  # daemon gone or saturated: a result may drop, the releases wait for the next message
        pending["released"], pending["skipped"] = [], []
        counts["results"] += kind == "result"
        last_sent[0] = time.monotonic()

    def ask_for_frames(again: bool = False) -> None:
        """Tell the daemon how many frames this worker can take now (its credit, replacing any earlier); `again`
        repeats the last request under its number (the daemon ignores it if it already answered it)."""
        requests[0] += not again
        with contextlib.suppress(zmq.Again):  # not connected yet: the idle repeat asks again
            pull.send(encode_ready(max_batch, requests[0] % (1 << 32)), flags=zmq.NOBLOCK)
        last_asked[0] = time.monotonic()

    def receive_waiting() -> list[tuple[FrameHeader, np.ndarray | None, float]]:
        """Every message waiting now, decoded: the newest max_batch frames (the rest skipped)."""
        frames = []
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
        for h, _, _ in frames[:-max_batch]:
            skip(h)
        return frames[-max_batch:]

    def skip(header: FrameHeader) -> None:
        """Done with this frame without a result: say so by number (and give its ring slot back)."""
        counts["skipped"] += 1
        pending["skipped"].append((header.acquisition, header.seq))
        if header.ring is not None:
            pending["released"].append((header.ring.slot, header.ring.gen))

    def preprocess(header: FrameHeader, pixels: np.ndarray | None, t_received_s: float) -> _Frame | None:
        """ADU → photons (a copy: a ring slot is given back after this)."""
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
            skip(header)
            return None
        if header.ring is not None:
            pending["released"].append((header.ring.slot, header.ring.gen))
        return _Frame(header, photons, t_received_s, (time.perf_counter() - t0) * 1000)

    send("hello")
    ask_for_frames()
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    try:
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("worker %s: the daemon (pid %d) is gone; exiting", worker_id, parent_pid)
                break
            if time.monotonic() - last_sent[0] > HEARTBEAT_S:  # also when only malformed messages come
                send("heartbeat")
            if time.monotonic() - last_asked[0] > ASK_AGAIN_S:
                ask_for_frames(again=True)
            if not poller.poll(200):
                continue
            batch = [f for f in (preprocess(*w) for w in receive_waiting()) if f is not None]
            if pending["released"] or pending["skipped"]:  # before inference: the slots are free meanwhile
                send("release")
            results = _infer(batch, loaded, counter, eventer, threshold, streams, event_one_view) if batch else []
            ask_for_frames()  # free again: the next frame (the newest then) comes while these results go out
            for result in results:
                send("result", **result)
    finally:
        send("bye")
        pull.close()
        push.close()
        ring.close()
    return {**counts, "malformed": sum(malformed.values()), **{f"malformed_{k}": v for k, v in malformed.items()}}


@dataclass
class StreamState:
    """One stream's temporal state: the frames the localization and counting models' window needs, the
    event model's keyframes, and the event maps of its last frames (t, map)."""

    history: deque
    event_window: EventWindow | None
    recent_maps: deque = field(default_factory=deque)


class Streams:
    """The temporal state of each stream of frames (FrameHeader.stream: one acquisition, position, grid
    tile, channel and z slice), so a window never mixes two positions or channels. The MAX_STREAMS most
    recently seen are kept (a plan with more interleaved streams starts their windows over)."""

    MAX_STREAMS = 64

    def __init__(self, *, window_frames: int, event_card: dict | None = None) -> None:
        """`event_card`: the event model's card, whose window (`event_window_for`: frames, spacing,
        min_window_frames) and min_frames each stream keeps; None without an event model."""
        self._window_frames, self._event_card = window_frames, event_card
        self._recent_maps = previous_maps_for(event_card) if event_card else 0
        self._streams: OrderedDict[tuple, StreamState] = OrderedDict()

    def get(self, key: tuple) -> StreamState:
        state = self._streams.get(key)
        if state is None:
            state = self._streams[key] = StreamState(
                deque(maxlen=self._window_frames),
                event_window_for(self._event_card) if self._event_card else None,
                deque(maxlen=self._recent_maps))
            while len(self._streams) > self.MAX_STREAMS:
                self._streams.popitem(last=False)
        else:
            self._streams.move_to_end(key)
        return state


def _infer(batch: list[_Frame], loaded: LoadedModel | None, counter: LoadedModel | None,
           eventer: LoadedModel | None, threshold: float, streams: Streams,
           event_one_view: bool = False) -> list[dict]:
    """Run the models on a batch of frames (oldest first); one result's fields per frame."""
    t0 = time.perf_counter()
    windows = []
    for f in batch:
        if loaded is not None:
            part = f.header.tile  # a tile is prepared with its whole frame's statistics
            f.prepared = prepare_frame(f.photons, loaded.card, fill_photons=part.fill_photons if part else None,
                                       median_photons=part.median_photons if part else None)
        history = streams.get(f.header.stream).history
        history.append(((f.header.t, f.photons.shape), f))
        windows.append(_consecutive_window(history))
    per_frame_locs: list[tuple[np.ndarray, float, np.ndarray | None]] = []  # locs, background, tile peaks
    infer_ms = post_ms = 0.0
    if loaded is not None:
        inputs = [window_input([w.prepared for w in window], loaded.card) for window in windows]
        t1 = time.perf_counter()
        maps: list[np.ndarray | None] = [None] * len(batch)
        for shape in {x.shape for x in inputs}:  # one call per input shape (a frame's edge tiles are smaller)
            same = [i for i, x in enumerate(inputs) if x.shape == shape]
            out = loaded.run(np.stack([inputs[i] for i in same]))
            for k, i in enumerate(same):
                maps[i] = out[k:k + 1]
        t2 = time.perf_counter()
        for f, m in zip(batch, maps, strict=True):
            if f.header.tile is None:
                per_frame_locs.append((*maps_to_localizations(loaded.card, m, f.photons, f.photons.shape,
                                                              f.header.camera, threshold=threshold), None))
                continue
            tile, stats = tile_of(f.header.tile, f.photons.shape)
            found = decode_tile(loaded.card, m, tile, f.photons, stats, f.header.camera, threshold=threshold)
            owned = tile.owns(found.locs[:, 0], found.locs[:, 1], f.header.camera.pixel_size_nm)
            per_frame_locs.append((found.locs[owned], stats.background_photons, found.peak_px[owned]))
        post_ms = (time.perf_counter() - t2) * 1000
        infer_ms = (t2 - t1) * 1000
        pre_batch_ms = (t1 - t0) * 1000
    else:  # e.g. live imaging: no single molecules to localize
        pre_batch_ms = 0.0
        for f in batch:
            finite = np.isfinite(f.photons).any()
            per_frame_locs.append((np.zeros((0, len(LOCALIZATION_COLUMNS))),
                                   float(np.nanmedian(f.photons)) if finite else 0.0, None))
    results = []
    for f, window, (locs, background, peaks) in zip(batch, windows, per_frame_locs, strict=True):
        finite = np.isfinite(locs).all(axis=1)  # JSON carries no NaN: such a row would lose the result
        locs, peaks = locs[finite], (peaks[finite].tolist() if peaks is not None else [])
        h = f.header
        t3 = time.perf_counter()
        count = density = score = None
        whole = h.tile is None  # the counting and event models look at whole frames only
        if whole and counter is not None and len(window) >= counter.card["frames"]:
            counted = window[-counter.card["frames"]:]
            count = len(count_frame(counter, np.stack([w.photons for w in counted])))
            density = count / (f.photons.size * (h.camera.pixel_size_nm / 1000) ** 2)
        stream = streams.get(h.stream)
        frames_window = stream.event_window.push(h.stream, h.t_capture_s, f.photons) if eventer and whole else None
        if frames_window is not None:
            current = event_map(eventer, frames_window, event_one_view)
            # the maps of the immediately preceding frames of this stream this worker saw (fewer after skips)
            recent_maps = stream.recent_maps
            recent = [m for k, m in recent_maps if 0 < h.t - k <= recent_maps.maxlen]
            score = persistent_score(current, recent)
            if recent_maps.maxlen:
                recent_maps.append((h.t, current))
        window_ms = (time.perf_counter() - t3) * 1000  # counting/event models: pre + inference + post
        stages = StageTimes(t_received_s=f.t_received_s, pre_ms=f.pre_ms + pre_batch_ms / len(batch),
                            infer_ms=infer_ms / len(batch) + window_ms, post_ms=post_ms / len(batch),
                            batch=len(batch))
        results.append({"seq": h.seq, "t_capture_s": h.t_capture_s, "header": h, "stages": stages,
                        "infer_ms": stages.pre_ms + stages.infer_ms + stages.post_ms,
                        "n_emitters": len(locs), "localizations": [tuple(r) for r in locs.tolist()], "peak_px": peaks,
                        "background_photons": background, "count_estimate": count, "density_per_um2": density,
                        "event_score": score})
    return results


def _consecutive_window(history: deque) -> list:
    """The newest frame in one stream's `history` and the frames just before it in time (and of its
    shape), oldest first, up to the first one missing. Keys: (time point t, shape)."""
    (t, shape), _ = history[-1]
    frames = []
    for (k, sh), frame in reversed(history):
        if k != t - len(frames) or sh != shape:
            break
        frames.append(frame)
    return frames[::-1]
