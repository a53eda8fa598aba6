"""The wire protocol over real ZeroMQ sockets: round trips, drops, malformed input."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest
import zmq

from smartscope.inference.worker import run_worker
from smartscope.transport import CameraParams, FrameHeader, MalformedMessage, decode_frame, encode_frame
from smartscope.transport.sockets import FramePublisher, ResultReceiver

CAM = CameraParams(pixel_size_nm=100, offset_adu=100, e_per_adu=0.5, qe=0.8)


def header(seq=0, shape=(32, 32)) -> FrameHeader:
    return FrameHeader(acquisition="t", seq=seq, t_capture_s=time.time(), shape=shape, dtype="uint16",
                       exposure_ms=10, camera=CAM, z_um=1.5)


def test_roundtrip_keeps_pixels_and_state():
    frame = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    h, f = decode_frame(encode_frame(header(7), frame))
    assert h.seq == 7 and h.z_um == 1.5
    np.testing.assert_array_equal(f, frame)


@pytest.mark.parametrize("parts", [[b"{}"], [b"not json", b"x"], [header().model_dump_json().encode(), b"short"]])
def test_malformed_frames_raise_malformed(parts):
    with pytest.raises(MalformedMessage):
        decode_frame(parts)


def test_publisher_drops_without_workers_and_never_blocks():
    pub = FramePublisher("tcp://127.0.0.1:*", hwm=2)
    t0 = time.perf_counter()
    sent = [pub.publish(header(i), np.zeros((32, 32), np.uint16)) for i in range(50)]
    assert time.perf_counter() - t0 < 1.0
    assert not any(sent) and pub.dropped == 50
    pub.close()


@contextlib.contextmanager
def worker_thread(pub: FramePublisher, rec: ResultReceiver):
    """A real worker (shipped ONNX model) in a thread; yields its counts dict (filled when it stops)
    and the results received so far, once it has said hello."""
    stop = threading.Event()
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(run_worker(pub.endpoint, rec.endpoint, model="localization.onnx",
                                                              stop=stop, threads=1)))
    t.start()
    results: list = []
    try:
        receive_until(rec, results, lambda r: r.kind == "hello")
        yield out, results
    finally:
        stop.set()
        t.join(10)


def receive_until(rec: ResultReceiver, results: list, done, timeout_s: float = 20.0) -> None:
    deadline = time.time() + timeout_s
    while not any(done(r) for r in results) and time.time() < deadline:
        results += rec.receive(100)


def test_worker_survives_malformed_messages(tmp_path):
    """A real worker (real ONNX model) counts bad messages and keeps serving."""
    pub = FramePublisher("tcp://127.0.0.1:*", hwm=16)
    rec = ResultReceiver("tcp://127.0.0.1:*")
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(rec.endpoint)
    raw.send(b"garbage result")
    try:
        with worker_thread(pub, rec) as (out, results):
            # malformed frames sent through the real publisher socket
            pub._socket.send_multipart([b"{bad header", b"123"])
            pub._socket.send_multipart([b"only one part"])
            assert pub.publish(header(5), np.full((32, 32), 100, np.uint16))
            receive_until(rec, results, lambda r: r.kind == "result")
            (res,) = [r for r in results if r.kind == "result"]
            assert res.seq == 5 and res.n_emitters == 0 and res.malformed_frames == 2
            assert rec.malformed == 1
    finally:
        raw.close()
        pub.close()
        rec.close()
    assert out["malformed"] == 2 and out["frames"] == 3


def test_worker_runs_the_newest_frame_and_counts_the_skipped():
    """A burst of frames waiting at once: one result, for the newest; the rest counted as skipped."""
    pub = FramePublisher("tcp://127.0.0.1:*", hwm=100)
    rec = ResultReceiver("tcp://127.0.0.1:*")
    try:
        with worker_thread(pub, rec) as (out, results):
            for seq in range(6):  # faster than one inference: they queue
                assert pub.publish(header(seq), np.full((32, 32), 100, np.uint16))
            receive_until(rec, results, lambda r: r.kind == "result" and r.seq == 5)
            seqs = [r.seq for r in results if r.kind == "result"]
            assert seqs[-1] == 5 and len(seqs) < 6
    finally:
        pub.close()
        rec.close()
    assert out["frames"] == 6 and out["skipped"] == 6 - len(seqs)
