"""The daemon's two sockets: frames out to the worker pool, results back in.

Both bind; with `keys` (transport.auth: curve) both are CURVE servers, so only
workers whose key the daemon authorized can take frames or send results
(transport/keys.py). Results are bounded in size (MAX_RESULT_BYTES: ZeroMQ
drops the connection of a peer that sends more; counted as `disconnected`)
and every message that is not a valid result is counted by reason.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import zmq

from smartscope.transport.keys import ServerKeys, serve_curve
from smartscope.transport.protocol import (
    FrameHeader,
    MalformedMessage,
    Result,
    check_frame,
    decode_result,
    encode_frame,
)
from smartscope.transport.ring import FrameRing

log = logging.getLogger("smartscope.transport")
#: largest result message the daemon accepts (a frame with ~100k localizations); bigger ones are cut off
MAX_RESULT_BYTES = 16 << 20


class FramePublisher:
    """PUSH frames to whichever worker is free; never blocks the caller.

    The inference stream is bounded: at most `hwm` frames queue per worker.
    When every queue is full, or no worker is connected, the frame is not sent
    and `dropped` counts it (the newest frames keep flowing; each worker then
    conflates what it has waiting to the newest). With `ring_slots`, pixels go
    through a shared-memory ring (transport/ring.py) and only headers through
    the socket; frames larger than a slot travel inline.
    """

    def __init__(self, address: str, hwm: int, *, ring_slots: int = 0, ring_slot_bytes: int = 0,
                 ctx: zmq.Context | None = None, keys: ServerKeys | None = None) -> None:
        self._socket = (ctx or zmq.Context.instance()).socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            serve_curve(self._socket, keys)
        self._socket.bind(address)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ring = None
        if ring_slots:
            try:
                self.ring = FrameRing(ring_slots, ring_slot_bytes)
            except OSError as e:  # e.g. /dev/shm too small: frames go inline, slower but complete
                log.warning("shared-memory frame ring off: %s", e)
        self.sent = 0
        self.dropped = 0

    def publish(self, header: FrameHeader, frame: np.ndarray) -> bool:
        """Send the frame (True) or drop it from the inference stream (False, counted)."""
        ref = None
        if self.ring is not None and frame.nbytes <= self.ring.slot_bytes:
            check_frame(header, frame)  # before the copy (encode_frame checks inline frames itself)
            ref = self.ring.put(frame)
            if ref is None:  # every slot lent: the workers are behind
                self.dropped += 1
                return False
        header.ring = ref
        header.t_sent_s = time.time()
        try:
            self._socket.send_multipart(encode_frame(header, frame), flags=zmq.NOBLOCK, copy=False)
        except BaseException as e:
            if ref is not None:  # the slot was never lent after all
                self.ring.release(ref.slot, ref.gen)
            if not isinstance(e, zmq.Again):
                raise
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def release(self, pairs) -> None:
        """Ring slots a worker gave back."""
        if self.ring is not None:
            for slot, gen in pairs:
                self.ring.release(slot, gen)

    def close(self) -> None:
        self._socket.close()
        if self.ring is not None:
            self.ring.close()


class ResultReceiver:
    """PULL results from all workers; malformed ones are counted and dropped.

    A socket monitor counts the connections ZeroMQ ends on its own, which
    never reach `recv`: a failed CURVE handshake (`unauthenticated`) and a
    peer cut off for a message over MAX_RESULT_BYTES or a protocol error
    (`disconnected`, which also counts workers that exit).
    """

    def __init__(self, address: str, *, ctx: zmq.Context | None = None, keys: ServerKeys | None = None) -> None:
        ctx = ctx or zmq.Context.instance()
        self._socket = ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_RESULT_BYTES)
        if keys is not None:
            serve_curve(self._socket, keys)
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)
        self._socket.bind(address)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.malformed: Counter[str] = Counter()
        self.connections: Counter[str] = Counter()  # unauthenticated, handshake_failed, disconnected

    def _read_monitor(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            reason = ("unauthenticated" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else
                      "disconnected" if event == zmq.EVENT_DISCONNECTED else "handshake_failed")
            self.connections[reason] += 1

    def receive(self, timeout_ms: int) -> list[Result]:
        """Every result waiting now (after up to timeout_ms for the first)."""
        results: list[Result] = []
        ready = dict(self._poller.poll(timeout_ms))
        if self._monitor in ready:
            self._read_monitor()
        if self._socket not in ready:
            return results
        while True:
            try:
                data = self._socket.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return results
            try:
                results.append(decode_result(data))
            except MalformedMessage as e:
                self.malformed[e.reason] += 1

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close()
        self._socket.close()
