"""Frame transport throughput: our protocol next to the ceilings of the library and the machine.

For 256², 1024² and 2048² uint16 frames, measured in one run:
- memcpy: a plain copy of the same bytes into rotating buffers (the machine's ceiling);
- raw (ipc, tcp): pyzmq zero-copy two-part sends of the same bytes, receiver views them
  (the library's ceiling on that socket type);
- ours (ipc, tcp): what the daemon does per frame, a FrameHeader built and encoded, the
  receiver decoding and validating it and viewing the pixels (transport/protocol.py);
- ring (local): the shared-memory frame ring (transport/ring.py): the frame copied into a
  slot, the header over ipc, the receiver viewing the slot and giving it back in a release
  message, as a worker does (one per frame here; a worker sends one per batch of frames).
Receivers run in their own process, as workers do. Each case streams about
2 GB; the cases run in a different order in each repeat; rates are medians over
repeats and ratios are medians of the ratios within each repeat (loopback
throughput on a shared 2-core machine varies by ±30% from run to run).
"""

from __future__ import annotations

import multiprocessing as mp
import shutil
import tempfile
import time

import numpy as np
import zmq

from smartscope.transport.keys import ClientKeys, connect_curve
from smartscope.transport.protocol import (
    CameraParams,
    FrameHeader,
    Result,
    decode_frame,
    decode_result,
    encode_frame,
    encode_result,
    pack_header,
)
from smartscope.transport.ring import FrameRing, RingReader

CAMERA = CameraParams(pixel_size_nm=100, offset_adu=100, e_per_adu=0.5, qe=0.8)
SIZES_PX = (256, 1024, 2048)
CAMERA_RATE_GB_S = 2048 * 2048 * 2 * 100 / 1e9  # a 2048² 16-bit sCMOS at 100 frames/s
WARMUP_FRAMES = 20
# bounded queues, as the daemon and the worker run them (unbounded, a receiver only slightly slower than
# the sender piles up gigabytes of queued frames and the run measures page faults instead)
SEND_HWM, RECEIVE_HWM = 16, 2
RATIOS = {"ours_vs_raw_ipc": ("ours ipc", "raw ipc"), "ours_vs_raw_tcp": ("ours tcp", "raw tcp"),
          "ring_vs_memcpy": ("ring", "memcpy")}


def _header(seq: int, shape: tuple[int, int]) -> FrameHeader:
    """As the acquisition loop builds it for every frame."""
    return FrameHeader(acquisition="bench", seq=seq, t_capture_s=time.time(), t_sent_s=time.time(), shape=shape,
                       dtype="uint16", exposure_ms=10, activation_mw=1.0, excitation_mw=50.0, z_um=0.0,
                       angle_deg=0.0, camera=CAMERA)


def _receiver(address: str, back_address: str, mode: str, n: int, ready, out, keys: ClientKeys | None = None) -> None:
    """Receive n frames, as a worker would take them (with its CURVE keys, when given); report (frames, seconds
    from first to last)."""
    ctx = zmq.Context()
    pull, back = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    if keys is not None:
        connect_curve(pull, keys)
        connect_curve(back, keys)
    pull.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
    pull.connect(address)
    back.connect(back_address)
    ring = RingReader()
    ready.set()
    checksum = 0
    t_first = t_last = 0.0
    for i in range(n):
        parts = pull.recv_multipart(copy=False)
        if mode == "raw":
            pixels = np.frombuffer(parts[1].buffer, np.uint16)  # the same bytes, no header to read
        else:
            header, pixels = decode_frame(parts)
            if header.ring is not None:
                pixels = ring.view(header.ring, header.shape, header.dtype)
                checksum += int(pixels[-1, -1])
                back.send(encode_result(Result(kind="release", worker_id="bench", provider="-", model="-",
                                               released=[header.ring[1:]])))  # as a worker gives it back
        checksum += int(pixels.flat[-1])
        if i == WARMUP_FRAMES - 1:
            t_first = time.perf_counter()
        t_last = time.perf_counter()
    ring.close()
    out.put((n - WARMUP_FRAMES, t_last - t_first, checksum))
    pull.close(0)
    back.close(0)
    ctx.term()


def _stream(mode: str, address: str, back_address: str, frame: np.ndarray, n: int) -> float:
    """Send n frames to a receiver process as fast as it takes them; GB/s between its first and last."""
    spawn = mp.get_context("spawn")
    ctx = zmq.Context.instance()
    push, back = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.SNDHWM, SEND_HWM)
    push.bind(address)
    back.bind(back_address)
    ready, out = spawn.Event(), spawn.Queue()
    proc = spawn.Process(target=_receiver, args=(push.getsockopt_string(zmq.LAST_ENDPOINT),
                                                 back.getsockopt_string(zmq.LAST_ENDPOINT), mode, n, ready, out))
    proc.start()
    ring = FrameRing(16, frame.nbytes) if mode == "ring" else None
    raw_header = pack_header(_header(0, frame.shape))  # same length as ours
    try:
        ready.wait(30)
        time.sleep(0.1)  # let the connection settle
        for seq in range(n):
            if mode == "raw":
                push.send_multipart([raw_header, frame], copy=False)
                continue
            header = _header(seq, frame.shape)
            if ring is not None:
                while (ref := ring.put(frame)) is None:  # every slot lent: wait for a release
                    _release(ring, back, timeout_ms=1000)
                header.ring = ref
                _release(ring, back, timeout_ms=0)
            push.send_multipart(encode_frame(header, frame), copy=False)
        frames, seconds, _ = out.get(timeout=120)
    finally:
        proc.join(30)
        push.close(0)
        back.close(0)
        if ring is not None:
            ring.close()
    return frames * frame.nbytes / seconds / 1e9


def _release(ring: FrameRing, back: zmq.Socket, timeout_ms: int) -> None:
    if back.poll(timeout_ms):
        while True:
            try:
                released = decode_result(back.recv(zmq.NOBLOCK)).released
            except zmq.Again:
                return
            for slot, gen in released:
                ring.release(slot, gen)


def _memcpy(frame: np.ndarray, n: int) -> float:
    buffers = [np.empty_like(frame) for _ in range(max(2, min(16, (256 << 20) // frame.nbytes)))]
    for b in buffers:  # first touch (page faults) outside the timing
        np.copyto(b, frame)
    t0 = time.perf_counter()
    for i in range(n):
        np.copyto(buffers[i % len(buffers)], frame)
    return n * frame.nbytes / (time.perf_counter() - t0) / 1e9


def run(quick: bool = False) -> dict:
    repeats = 1 if quick else 5
    target_bytes = (0.4 if quick else 2.0) * 1e9
    tmp = tempfile.mkdtemp(prefix="smartscope-bench-")
    cases = {"memcpy": None, "raw ipc": "ipc", "ours ipc": "ipc", "ring": "ipc",
             "raw tcp": "tcp", "ours tcp": "tcp"}
    results: dict = {"camera_2048px_100fps_gb_s": round(CAMERA_RATE_GB_S, 3), "repeats": repeats}
    print(f"{'frame':>6} {'case':<9} {'GB/s':>6} {'frames/s':>9}   (median of {repeats})")
    for size in SIZES_PX:
        frame = np.random.default_rng(0).integers(0, 4000, (size, size), dtype=np.uint16)
        n = int(np.clip(target_bytes / frame.nbytes, 300, 20000)) + WARMUP_FRAMES
        rates: dict[str, list[float]] = {c: [] for c in cases}
        names = list(cases)
        for rep in range(repeats):
            for case in names[rep % len(names):] + names[:rep % len(names)]:  # a new order each repeat
                transport = cases[case]
                if transport is None:
                    rates[case].append(_memcpy(frame, n))
                    continue
                address = f"ipc://{tmp}/{case.replace(' ', '-')}-{size}-{rep}" if transport == "ipc" \
                    else "tcp://127.0.0.1:*"
                rates[case].append(_stream(case.split()[0], address, f"ipc://{tmp}/back", frame, n))
        row = {c: round(float(np.median(v)), 3) for c, v in rates.items()}
        row["each_repeat"] = {c: [round(x, 2) for x in v] for c, v in rates.items()}
        for key, (ours, base) in RATIOS.items():  # paired within each repeat, then the median
            row[key] = round(float(np.median(np.divide(rates[ours], rates[base]))), 3)
        row["best_local_vs_camera"] = round(max(row["ours ipc"], row["ring"]) / CAMERA_RATE_GB_S, 2)
        results[f"{size}x{size}"] = row
        for case in cases:
            print(f"{size:>6} {case:<9} {row[case]:>6.2f} {row[case] * 1e9 / frame.nbytes:>9.0f}")
        print(f"{size:>6} ours/raw: ipc {row['ours_vs_raw_ipc']:.2f}, tcp {row['ours_vs_raw_tcp']:.2f}; "
              f"ring/memcpy {row['ring_vs_memcpy']:.2f}; best local path = "
              f"{row['best_local_vs_camera']:.1f}x a 2048² camera at 100 frames/s")
    shutil.rmtree(tmp, ignore_errors=True)
    big = results[f"{SIZES_PX[-1]}x{SIZES_PX[-1]}"]
    results["goals"] = {
        "ours_vs_raw_min_ge_0.9": min(min(results[f"{s}x{s}"]["ours_vs_raw_ipc"], results[f"{s}x{s}"]["ours_vs_raw_tcp"])
                                      for s in SIZES_PX) >= 0.9,
        "local_2048_ge_2.4_gb_s": max(big["ours ipc"], big["ring"]) >= 2.4,
        "ring_vs_memcpy_2048_ge_0.5": big["ring_vs_memcpy"] >= 0.5,
    }
    print("goals:", results["goals"])
    return results
