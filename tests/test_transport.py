"""The wire protocol over real ZeroMQ sockets: round trips, drops, malformed input."""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import threading
import time

import numpy as np
import pytest
import zmq

from smartscope.inference.worker import run_worker
from smartscope.transport import CameraParams, FrameHeader, MalformedMessage, decode_frame, encode_frame
from smartscope.transport.protocol import RingRef, TilePart, pack_header
from smartscope.transport.ring import FrameRing, RingReader
from smartscope.transport.sockets import FramePublisher, ResultReceiver

CAM = CameraParams(pixel_size_nm=100, offset_adu=100, e_per_adu=0.5, qe=0.8, read_noise_e=1.6)


def header(seq=0, shape=(32, 32)) -> FrameHeader:
    return FrameHeader(acquisition="t", seq=seq, t_capture_s=time.time(), shape=shape, dtype="uint16",
                       exposure_ms=10, camera=CAM, z_um=1.5)


def test_roundtrip_keeps_pixels_and_state():
    frame = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    sent = header(7)
    sent.t_sent_s, sent.activation_mw = 1.25, 30.0
    h, f = decode_frame(encode_frame(sent, frame))
    assert h == sent and h.z_um == 1.5 and h.excitation_mw is None and h.acquisition == "t"
    assert h.camera.read_noise_e == 1.6
    np.testing.assert_array_equal(f, frame)
    assert not f.flags.owndata  # a view of the received buffer, not a copy
    ringed = dataclasses.replace(sent, ring=RingRef("smartscope-1-ab", 3, 9), acquisition="αβ")
    assert decode_frame(encode_frame(ringed, None)) == (ringed, None)
    tiled = dataclasses.replace(sent, tile=TILE)
    assert decode_frame(encode_frame(tiled, frame))[0] == tiled and tiled.stream[-1] == 2 and sent.stream[-1] == -1


#: tile 2 of 4 of a 64 x 48 frame: the 32² crop at (16, 8) owns rows 20..40, columns 10..30
TILE = TilePart(2, 4, 16, 8, 20, 40, 10, 30, 64, 48, 0.0, 12.5, 12.25)


def _packed(**changes) -> bytes:
    return pack_header(dataclasses.replace(header(), **changes))


def _corrupt(offset: int, value: bytes) -> bytes:
    """A good header with bytes replaced at `offset` (see protocol._FIXED for the layout)."""
    good = _packed()
    return good[:offset] + value + good[offset + len(value):]


@pytest.mark.parametrize(("parts", "reason"), [
    ([b"not a header", b"x"], "format"),
    ([b"", b"x"], "format"),
    ([b"XXXX" + _packed()[4:], b"x"], "format"),
    ([_corrupt(4, struct.pack("<H", 1)), b"x"], "version"),
    ([_corrupt(6, b"\x09"), b"x"], "header"),  # dtype code
    ([_packed(shape=(0, 32)), b""], "header"),
    ([_packed(exposure_ms=-1.0), b"x"], "header"),
    ([_packed()[:-1], b"x"], "header"),  # the acquisition id cut short
    ([_packed(camera=CameraParams.model_construct(pixel_size_nm=-5, offset_adu=0, e_per_adu=1, qe=0.5,
                                                  em_gain=1.0)), b"x"], "header"),
    ([_packed(camera=CAM.model_construct(**{**CAM.model_dump(), "read_noise_e": -1.0})), b"x"], "header"),
    ([_packed(), b"short"], "size"),
    ([_packed(), np.zeros((32, 33), np.uint16).tobytes()], "size"),
    ([_packed()], "parts"),
    ([_packed(), b"x", b"y"], "parts"),
    ([], "parts"),
    ([_packed(ring=RingRef("r", 0, 1)), b"x"], "parts"),
    ([_packed(ring=RingRef("r", 0, 0))], "ring"),
    ([_packed(tile=TILE._replace(index=4)), b"x"], "header"),  # tile 4 of 4
    ([_packed(tile=TILE._replace(frame_width=39)), b"x"], "header"),  # the crop overhangs the frame
    ([_packed(tile=TILE._replace(core_y1=49)), b"x"], "header"),  # the core overhangs the crop
    ([_packed(tile=TILE._replace(core_x0=30)), b"x"], "header"),  # an empty core
    ([_packed(tile=TILE._replace(median_photons=float("nan"))), b"x"], "header"),
])
def test_malformed_frames_are_named_by_reason(parts, reason):
    with pytest.raises(MalformedMessage) as e:
        decode_frame(parts)
    assert e.value.reason == reason


def test_without_a_worker_each_frame_replaces_the_last_and_nothing_blocks():
    pub = FramePublisher("tcp://127.0.0.1:*", hwm=2)
    try:
        t0 = time.perf_counter()
        replaced = [pub.publish(header(i), np.zeros((32, 32), np.uint16)) for i in range(50)]
        assert time.perf_counter() - t0 < 1.0
        assert replaced[0] is None and [h.seq for h in replaced[1:]] == list(range(49))
        assert pub.withdraw("another run") == []
        assert [h.seq for h in pub.withdraw("t")] == [49] and pub.withdraw("t") == []
        assert pub.sent == 0 and pub.replaced == 50
    finally:
        pub.close()


def test_ready_requests_are_credits_and_bad_ones_are_counted():
    """A real DEALER peer gets exactly as many frames as it asked for, the newest; malformed requests are
    counted by reason and give nothing."""
    from smartscope.transport.protocol import PROTOCOL_VERSION, encode_ready

    pub = FramePublisher("tcp://127.0.0.1:*", hwm=16)
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(pub.endpoint)
    try:
        for bad in (b"ready", b"SSRD" + struct.pack("<HHI", PROTOCOL_VERSION, 0, 0),
                    b"SSRD" + struct.pack("<HHI", PROTOCOL_VERSION - 1, 1, 0)):
            peer.send(bad)
        peer.send_multipart([encode_ready(1), b"extra"])
        deadline = time.time() + 5
        while sum(pub.malformed.values()) < 4 and time.time() < deadline:
            time.sleep(0.01)
        assert pub.malformed == {"format": 1, "header": 1, "version": 1, "parts": 1}
        pub.publish(header(0), np.zeros((32, 32), np.uint16))
        assert not peer.poll(300)  # no credit, no frame
        peer.send(encode_ready(2, 1))
        assert peer.poll(2000)
        assert decode_frame(peer.recv_multipart())[0].seq == 0  # the waiting frame goes at once
        peer.send(encode_ready(2, 1))  # an idle repeat of request 1 crossing its frame: it gives nothing more
        pub.publish(header(1), np.zeros((32, 32), np.uint16))
        assert peer.poll(2000) and decode_frame(peer.recv_multipart())[0].seq == 1
        replaced = [pub.publish(header(seq), np.zeros((32, 32), np.uint16)) for seq in (2, 3, 4)]
        assert not peer.poll(300)  # both credits of request 1 spent, its repeat ignored
        assert [r.seq if r else None for r in replaced] == [None, 2, 3]
        peer.send(encode_ready(1, 1))
        assert not peer.poll(300)
        peer.send(encode_ready(1, 2))
        assert peer.poll(2000) and decode_frame(peer.recv_multipart())[0].seq == 4  # the newest
        deadline = time.time() + 2
        while pub.sent < 3 and time.time() < deadline:  # counted just after the send
            time.sleep(0.01)
        assert pub.sent == 3 and pub.replaced == 2 and pub.workers_ready == 0
    finally:
        peer.close()
        pub.close()


@contextlib.contextmanager
def worker_thread(frames_address: str, rec: ResultReceiver):
    """A real worker (shipped ONNX model) in a thread; yields its counts dict (filled when it stops)
    and the results received so far, once it has said hello."""
    stop = threading.Event()
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(run_worker(frames_address, rec.endpoint, model="localization.onnx",
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


@contextlib.contextmanager
def raw_router():
    """A bare ROUTER socket in the daemon's place, to send a worker what the publisher never would."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    try:
        yield router, router.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        router.close()


def test_worker_survives_malformed_messages(tmp_path):
    """A real worker (real ONNX model) counts bad messages and keeps serving."""
    rec = ResultReceiver("tcp://127.0.0.1:*")
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(rec.endpoint)
    raw.send(b"garbage result")
    try:
        with raw_router() as (router, address), worker_thread(address, rec) as (out, results):
            assert router.poll(5000)
            identity, _ready = router.recv_multipart()
            for parts in ([b"{bad header", b"123"], [_packed()],
                          [_corrupt(4, struct.pack("<H", 1)), np.zeros((32, 32), np.uint16)],
                          [_packed(seq=4, ring=RingRef("smartscope-1-0badc0de", 0, 1))]):  # no such ring
                router.send_multipart([identity, *parts])
            receive_until(rec, results, lambda r: ("t", 4) in r.skipped)  # reported by number
            router.send_multipart([identity, *encode_frame(header(5), np.full((32, 32), 100, np.uint16))])
            receive_until(rec, results, lambda r: r.kind == "result")
            (res,) = [r for r in results if r.kind == "result"]
            assert res.seq == 5 and res.n_emitters == 0
            assert res.malformed == {"format": 1, "parts": 1, "version": 1, "ring": 1}
            assert rec.malformed == {"result": 1}
    finally:
        raw.close()
        rec.close()
    assert out["malformed"] == 4 and out["frames"] == 5
    assert out["malformed_format"] == out["malformed_parts"] == out["malformed_version"] == 1


def test_a_busy_worker_is_sent_the_newest_frame_and_the_replaced_are_counted():
    """A burst faster than one inference: the worker takes the first, the newest goes when it is free again,
    the frames between never leave the daemon (returned by publish), and the worker skips nothing."""
    pub = FramePublisher("tcp://127.0.0.1:*", hwm=100)
    rec = ResultReceiver("tcp://127.0.0.1:*")
    try:
        with worker_thread(pub.endpoint, rec) as (out, results):
            deadline = time.time() + 5
            while pub.workers_ready == 0 and time.time() < deadline:
                time.sleep(0.01)
            frame = np.full((256, 256), 100, np.uint16)  # tens of ms to infer: the burst comes meanwhile
            replaced = [pub.publish(header(0, frame.shape), frame)]
            while pub.sent == 0 and time.time() < deadline:
                time.sleep(0.001)
            replaced += [pub.publish(header(seq, frame.shape), frame) for seq in range(1, 6)]
            receive_until(rec, results, lambda r: r.kind == "result" and r.seq == 5)
            seqs = [r.seq for r in results if r.kind == "result"]
            not_sent = [h.seq for h in replaced if h is not None]
            assert seqs[0] == 0 and seqs[-1] == 5 and len(seqs) < 6 and sorted(seqs + not_sent) == list(range(6))
            assert results[0].kind == "hello" and results[0].threads == 1 and results[0].max_batch == 1
        receive_until(rec, results, lambda r: r.kind == "bye")  # the worker stopped: it says so
        assert results[-1].kind == "bye" and results[-1].frames_received == len(seqs)
    finally:
        pub.close()
        rec.close()
    assert out["frames"] == len(seqs) == pub.sent and out["skipped"] == 0


def test_worker_runs_the_newest_of_frames_waiting_at_once_and_counts_the_skipped():
    """More frames than it asked for (a daemon that ignores credits): one result, for the newest; the rest
    counted as skipped, by number."""
    rec = ResultReceiver("tcp://127.0.0.1:*")
    try:
        with raw_router() as (router, address), worker_thread(address, rec) as (out, results):
            assert router.poll(5000)
            identity, _ready = router.recv_multipart()
            for seq in range(6):
                router.send_multipart([identity, *encode_frame(header(seq), np.full((32, 32), 100, np.uint16))])
            receive_until(rec, results, lambda r: r.kind == "result" and r.seq == 5)
            seqs = [r.seq for r in results if r.kind == "result"]
            skipped = [seq for r in results for acquisition, seq in r.skipped if acquisition == "t"]
            assert seqs[-1] == 5 and len(seqs) < 6
            assert sorted(seqs + skipped) == list(range(6))  # every frame accounted for, by number
    finally:
        rec.close()
    assert out["frames"] == 6 and out["skipped"] == 6 - len(seqs)


def test_frame_ring_lends_each_slot_once_and_reclaims_only_abandoned_ones():
    ring = FrameRing(slots=2, slot_bytes=32 * 32 * 2, reclaim_after_s=60)
    reader = RingReader()
    try:
        frames = [np.full((32, 32), v, np.uint16) for v in (1, 2, 3)]
        a, b = ring.put(frames[0]), ring.put(frames[1])
        assert ring.put(frames[2]) is None and ring.full == 1  # both lent: the frame skips inference
        np.testing.assert_array_equal(reader.view(a, (32, 32), "uint16"), frames[0])
        ring.release(a.slot, a.gen)
        c = ring.put(frames[2])
        assert c.slot == a.slot and c.gen == a.gen + 1
        assert not reader.current(a) and reader.current(c)  # a late reader of `a` would notice
        ring.release(a.slot, a.gen)  # a release of an old generation frees nothing
        assert ring.stale_releases == 1 and ring.lent == 2
        ring.reclaim_after_s = 0  # both holders presumed dead
        d = ring.put(frames[0])
        assert ring.reclaimed == 2 and d is not None and not reader.current(b if d.slot == b.slot else c)
        with pytest.raises(ValueError, match="does not fit"):
            ring.put(np.zeros((64, 64), np.uint16))
        with pytest.raises(MalformedMessage) as e:
            reader.view(RingRef(name=ring.name, slot=5, gen=1), (32, 32), "uint16")
        assert e.value.reason == "ring"
    finally:
        reader.close()
        ring.close()
    with pytest.raises(MalformedMessage, match="another host"):
        RingReader().view(a, (32, 32), "uint16")  # the block is gone (as seen from another host)


def test_worker_reads_ring_frames_in_place_and_gives_every_slot_back():
    """Same frame inline and through the ring: identical localizations; no slot stays lent."""
    from smartscope.simulation import SimulatedMicroscope, SimulationConfig

    scope = SimulatedMicroscope(SimulationConfig.model_validate({"camera": {"width_px": 64, "height_px": 64}}), seed=3)
    scope.activation_mw, scope.excitation_mw = 30.0, 50.0
    frame, truth = scope.snap(exposure_ms=20)
    assert len(truth.x_nm) >= 3
    inline = FramePublisher("tcp://127.0.0.1:*", hwm=16)
    ringed = FramePublisher("tcp://127.0.0.1:*", hwm=16, ring_slots=4, ring_slot_bytes=frame.nbytes)
    rec = ResultReceiver("tcp://127.0.0.1:*")
    found = {}
    try:
        for name, pub in (("inline", inline), ("ring", ringed)):
            with worker_thread(pub.endpoint, rec) as (_, results):
                for seq in range(3):
                    assert pub.publish(header(seq, frame.shape), frame) is None
                    receive_until(rec, results, lambda r, s=seq: r.kind == "result" and r.seq == s)
                for r in results:
                    pub.release(r.released)
                found[name] = [r for r in results if r.kind == "result"]
        assert [r.header.ring is not None for r in found["ring"]] == [True] * 3
        assert ringed.ring.written == 3 and ringed.ring.lent == 0 and inline.ring is None
        assert len(found["ring"][0].localizations) >= 3
        assert found["ring"][0].localizations == found["inline"][0].localizations
        st = found["ring"][-1].stages
        assert st.batch == 1 and st.infer_ms > 0 and st.t_received_s >= found["ring"][-1].header.t_sent_s - 1e-3
    finally:
        inline.close()
        ringed.close()
        rec.close()


@pytest.mark.parametrize(("name", "content"), [
    ("../etc/passwd", None),                       # not a ring name: never opened
    ("psm_1234", None),                            # another program's shared memory
    ("smartscope-1-0badc0de", b""),                # empty block
    ("smartscope-1-0badc0de", b"\0" * 4096),       # no magic
])
def test_ring_reader_refuses_blocks_that_are_not_complete_rings(name, content):
    from smartscope.transport.ring import SHM_DIR

    path = SHM_DIR / name
    if content is not None:
        path.write_bytes(content)
    try:
        with pytest.raises(MalformedMessage) as e:
            RingReader().view(RingRef(name, 0, 1), (32, 32), "uint16")
        assert e.value.reason == "ring"
    finally:
        if content is not None:
            path.unlink()


def test_ring_reader_refuses_a_ring_shorter_than_its_header_says():
    ring = FrameRing(slots=2, slot_bytes=4096)
    try:
        fake = np.frombuffer(ring._shm.buf, np.uint64, count=3).copy()
        fake[1] = 1000  # claims 1000 slots in a block that holds 2
        np.ndarray(3, np.uint64, buffer=ring._shm.buf)[:] = fake
        with pytest.raises(MalformedMessage, match="not a complete"):
            RingReader().view(RingRef(ring.name, 999, 1), (32, 32), "uint16")
    finally:
        ring.close()


def test_a_tiled_frame_goes_out_tile_by_tile_against_credits_and_its_rest_is_withdrawn():
    """With a tiler, each credit takes one tile (inline, never the ring), all of a frame's tiles go before the next
    frame leaves the mailbox, and at the end of a run the frame whose tiles have not all gone is withdrawn."""
    from smartscope.inference.session import load_model
    from smartscope.inference.tiling import FrameTiler
    from smartscope.transport.protocol import encode_ready

    pub = FramePublisher("tcp://127.0.0.1:*", hwm=16, ring_slots=4, ring_slot_bytes=200 * 200 * 2,
                         tiler=FrameTiler(load_model("localization.onnx", "cpu", threads=1), core_px=100))
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(pub.endpoint)
    try:
        for seq in (0, 1):
            pub.publish(header(seq, (200, 200)), np.full((200, 200), 150, np.uint16))
        peer.send(encode_ready(3, 1))
        got = []
        for _ in range(3):
            assert peer.poll(2000)
            got.append(decode_frame(peer.recv_multipart()))
        assert [(h.seq, h.tile.index, h.tile.count, h.ring) for h, _ in got] == [(1, i, 4, None) for i in range(3)]
        assert all(px.shape == h.shape for h, px in got) and got[0][0].shape == (136, 136)
        assert got[0][0].tile.median_photons == got[2][0].tile.median_photons == pytest.approx((150 - 100) * 0.5 / 0.8)
        pub.publish(header(2, (200, 200)), np.full((200, 200), 150, np.uint16))
        assert [(h.seq, h.tile and h.tile.index) for h in pub.withdraw("t")] == [(1, 3), (2, None)]
        deadline = time.time() + 2
        while pub.sent < 3 and time.time() < deadline:  # counted just after the send: the peer may have it first
            time.sleep(0.01)
        assert pub.tiled == 1 and pub.sent == 3 and pub.replaced == 3
    finally:
        peer.close()
        pub.close()
