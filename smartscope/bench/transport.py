"""Frame transport over ZeroMQ on loopback: our two-part zero-copy messages vs a
pickled-array baseline, same sockets, same frames, measured in the same run.

A receiver thread decodes every message (header validated by pydantic, the
buffer viewed as an array) and reports back; we time round trips and
throughput for 128² and 512² uint16 frames.
"""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import zmq

from smartscope.transport.protocol import CameraParams, FrameHeader, decode_frame, encode_frame

CAMERA = CameraParams(pixel_size_nm=100, offset_adu=100, e_per_adu=0.5, qe=0.8)


def _echo(address: str, reply_address: str, codec: str, stop: threading.Event) -> None:
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(address)
    push.connect(reply_address)
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    while not stop.is_set():
        if not poller.poll(50):
            continue
        if codec == "smartscope":
            header, frame = decode_frame(pull.recv_multipart(copy=False))
            seq = header.seq
        else:
            seq, frame = pickle.loads(pull.recv())
        push.send(int(seq).to_bytes(8, "little") + int(frame[0, 0]).to_bytes(4, "little"))
    pull.close()
    push.close()


def _measure(codec: str, shape: tuple[int, int], n: int) -> dict[str, float]:
    ctx = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind("tcp://127.0.0.1:*")
    pull.bind("tcp://127.0.0.1:*")
    stop = threading.Event()
    worker = threading.Thread(target=_echo, args=(push.getsockopt_string(zmq.LAST_ENDPOINT),
                                                  pull.getsockopt_string(zmq.LAST_ENDPOINT), codec, stop))
    worker.start()
    frame = np.random.default_rng(0).integers(0, 4000, shape, dtype=np.uint16)
    rtt = []
    try:
        time.sleep(0.2)  # let the sockets connect
        t0 = time.perf_counter()
        for seq in range(n):
            sent = time.perf_counter()
            if codec == "smartscope":
                header = FrameHeader(seq=seq, t_capture_s=time.time(), shape=shape, dtype="uint16",
                                     exposure_ms=10, camera=CAMERA)
                push.send_multipart(encode_frame(header, frame), copy=False)
            else:
                push.send(pickle.dumps((seq, frame), protocol=pickle.HIGHEST_PROTOCOL))
            pull.recv()
            rtt.append(time.perf_counter() - sent)
        total = time.perf_counter() - t0
    finally:
        stop.set()
        worker.join(5)
        push.close(0)
        pull.close(0)
    rtt_ms = np.array(rtt) * 1000
    return {"frames_per_s": round(n / total, 1), "rtt_ms_p50": round(float(np.median(rtt_ms)), 3),
            "rtt_ms_p99": round(float(np.percentile(rtt_ms, 99)), 3),
            "mb_per_s": round(n * frame.nbytes / total / 1e6, 1)}


def run(quick: bool = False) -> dict:
    n = 300 if quick else 2000
    results = {}
    print(f"{'frame':>9} {'codec':<11} {'frames/s':>9} {'MB/s':>7} {'RTT p50 ms':>10} {'RTT p99 ms':>10}")
    for shape in ((128, 128), (512, 512)):
        key = f"{shape[0]}x{shape[1]}"
        results[key] = {}
        for codec in ("smartscope", "pickle"):
            r = _measure(codec, shape, n)
            results[key][codec] = r
            print(f"{key:>9} {codec:<11} {r['frames_per_s']:>9.0f} {r['mb_per_s']:>7.0f} {r['rtt_ms_p50']:>10.3f} "
                  f"{r['rtt_ms_p99']:>10.3f}")
        results[key]["throughput_ratio_vs_pickle"] = round(
            results[key]["smartscope"]["frames_per_s"] / results[key]["pickle"]["frames_per_s"], 3)
    return results
