"""The daemon's two sockets: frames out to the worker pool, results back in.

Both bind; with `keys` (transport.auth: curve) both are CURVE servers, so only
workers whose key the daemon authorized can take frames or send results
(transport/keys.py). Results are bounded in size (MAX_RESULT_BYTES: ZeroMQ
drops the connection of a peer that sends more; counted as `disconnected`)
and every message that is not a valid result is counted by reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict

import numpy as np
import zmq

from smartscope.transport.keys import ServerKeys, serve_curve
from smartscope.transport.protocol import (
    FrameHeader,
    MalformedMessage,
    Result,
    check_frame,
    decode_ready,
    decode_result,
    encode_frame,
)
from smartscope.transport.ring import FrameRing

log = logging.getLogger("smartscope.transport")
#: largest result message the daemon accepts (a frame with ~100k localizations); bigger ones are cut off
MAX_RESULT_BYTES = 16 << 20


class FramePublisher:
    """Give each frame to a worker that asked for one; never blocks the caller, never queues behind a busy worker.

    Fresh, not queued. A worker asks for frames (a READY message with how many
    it can take at once: 1 on CPU, its batch on GPU) on its DEALER socket when
    it starts and each time it has sent its results; this ROUTER sends a frame
    only against such a credit. A frame that finds every worker busy waits in a
    one-frame mailbox, where the next frame replaces it (`publish` returns the
    replaced frame's header, so the run counts it as not sent), and goes out the
    moment a worker asks. So no frame ever waits in a socket queue: a result is
    at most one frame interval (the mailbox), plus transport, plus its inference
    old when it reaches the policies, at any frame size and number of workers.
    A sender thread owns the socket; `publish` only fills the mailbox and wakes
    it. With `ring_slots`, pixels go through a shared-memory ring
    (transport/ring.py), copied by the sender thread, and only headers travel
    through the socket; a frame larger than a slot, or one that finds every
    slot lent, travels inline.
    """

    def __init__(self, address: str, hwm: int, *, ring_slots: int = 0, ring_slot_bytes: int = 0,
                 ctx: zmq.Context | None = None, keys: ServerKeys | None = None) -> None:
        self._socket = (ctx or zmq.Context.instance()).socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.SNDHWM, hwm)  # per worker; credits keep far below it
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a worker gone is an error, not a silent drop
        self._socket.setsockopt(zmq.MAXMSGSIZE, 4096)  # workers send only READY messages (CURVE handshakes: ~300 B)
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
        self._credits: OrderedDict[bytes, int] = OrderedDict()  # worker identity → frames it asked for
        self._mailbox: tuple[FrameHeader, np.ndarray] | None = None
        self._lock = threading.Lock()
        self._taken = threading.Condition(self._lock)  # the sender emptied the mailbox
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._closing = threading.Event()
        self.sent = 0
        self.replaced = 0  # frames a newer one replaced in the mailbox, or withdrawn from it
        self.send_failed = 0  # frames whose worker vanished as they went out (counted lost by the run)
        self.malformed: Counter[str] = Counter()  # bad messages from the workers' side of this socket
        self._sender = threading.Thread(target=self._serve, name="frame-sender", daemon=True)
        self._sender.start()

    def publish(self, header: FrameHeader, frame: np.ndarray) -> FrameHeader | None:
        """Offer the frame to the workers; returns the header of the frame it replaced, if one was waiting."""
        check_frame(header, frame)
        with self._lock:
            replaced, self._mailbox = self._mailbox, (header, frame)
        if replaced is not None:
            self.replaced += 1
        self._wake()
        return replaced[0] if replaced is not None else None

    def offer(self, header: FrameHeader, frame: np.ndarray, timeout_s: float) -> bool:
        """Like publish, but replacing nothing: wait until the frame waiting before it was taken (False after
        timeout_s, the frame not offered). For frames that must all be inferred (the catch-up after a run)."""
        check_frame(header, frame)
        with self._taken:
            if not self._taken.wait_for(lambda: self._mailbox is None, timeout_s):
                return False
            self._mailbox = (header, frame)
        self._wake()
        return True

    def withdraw(self, acquisition: str) -> FrameHeader | None:
        """Take back the frame of this acquisition still waiting for a worker (at the end of its run)."""
        with self._lock:
            if self._mailbox is None or self._mailbox[0].acquisition != acquisition:
                return None
            (header, _), self._mailbox = self._mailbox, None
            self._taken.notify_all()
        self.replaced += 1
        return header

    @property
    def workers_ready(self) -> int:
        """Workers that asked for frames and have not been given them yet."""
        return len(self._credits)

    def release(self, pairs) -> None:
        """Ring slots a worker gave back."""
        if self.ring is not None:
            for slot, gen in pairs:
                self.ring.release(slot, gen)

    def close(self) -> None:
        self._closing.set()
        self._wake()
        self._sender.join(5)
        self._socket.close()
        os.close(self._wake_read)
        os.close(self._wake_write)
        if self.ring is not None:
            self.ring.close()

    # -- the sender thread: the only user of the socket ------------------------

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes it
            os.write(self._wake_write, b"!")

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_read, zmq.POLLIN)
        while not self._closing.is_set():
            for what, _ in poller.poll(1000):
                if what is self._socket:
                    self._read_credits()
                else:
                    os.read(self._wake_read, 4096)
            self._send_waiting()

    def _read_credits(self) -> None:
        while True:
            try:
                identity, *rest = self._socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                if len(rest) != 1:
                    raise MalformedMessage("parts", f"a ready message has 1 part, got {len(rest)}")
                frames = decode_ready(rest[0])
            except MalformedMessage as e:
                self.malformed[e.reason] += 1
                continue
            self._credits[identity] = frames  # what it can take now (a repeat asks again, it does not add)
            self._credits.move_to_end(identity)  # served after those waiting longer

    def _send_waiting(self) -> None:
        while self._credits:
            with self._lock:
                if self._mailbox is None:
                    return
                (header, frame), self._mailbox = self._mailbox, None
                self._taken.notify_all()
            self._send(header, frame)

    def _send(self, header: FrameHeader, frame: np.ndarray) -> None:
        """To the worker that has waited longest; one that vanished is forgotten and the next one tried."""
        ref = None
        if self.ring is not None and frame.nbytes <= self.ring.slot_bytes:
            ref = self.ring.put(frame)  # None: every slot lent, the frame goes inline
        header.ring, header.t_sent_s = ref, time.time()
        parts = encode_frame(header, frame)
        while self._credits:
            identity = next(iter(self._credits))
            try:
                self._socket.send_multipart([identity, *parts], flags=zmq.NOBLOCK, copy=False)
            except zmq.ZMQError as e:  # EHOSTUNREACH: gone; EAGAIN: its queue is full. Either way not it
                if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                    raise
                del self._credits[identity]
                continue
            self._credits[identity] -= 1
            if self._credits[identity] <= 0:
                del self._credits[identity]
            self.sent += 1
            return
        self.send_failed += 1
        if ref is not None:
            self.ring.release(ref.slot, ref.gen)


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
