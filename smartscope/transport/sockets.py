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
from collections import Counter, OrderedDict, deque
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from smartscope.inference.tiling import FrameTiler

log = logging.getLogger("smartscope.transport")
#: largest result message the daemon accepts (a frame with ~100k localizations); bigger ones are cut off
MAX_RESULT_BYTES = 16 << 20
#: workers whose last answered request the frame sender remembers (the longest-silent are forgotten)
MAX_WORKERS_REMEMBERED = 1024


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
    slot lent, travels inline. With a `tiler` (inference/tiling.py FrameTiler),
    a frame larger than one worker should take is cut into tiles as it leaves
    the mailbox; each tile goes, inline, to the next worker that asks, and the
    tiles of one frame all go before the next frame leaves the mailbox.
    """

    def __init__(self, address: str, hwm: int, *, ring_slots: int = 0, ring_slot_bytes: int = 0,
                 ctx: zmq.Context | None = None, keys: ServerKeys | None = None,
                 tiler: FrameTiler | None = None) -> None:
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
        self._requests: dict[bytes, int] = {}  # worker identity → the number of its request the credit is for
        self._served: dict[bytes, int] = {}  # worker identity → the number of its request last sent frames
        self._mailbox: tuple[FrameHeader, np.ndarray] | None = None
        self._tiler = tiler
        self._tiles: deque[tuple[FrameHeader, np.ndarray]] = deque()  # the rest of the frame now going out in tiles
        self._lock = threading.Lock()
        self._taken = threading.Condition(self._lock)  # the sender emptied the mailbox
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._closing = threading.Event()
        self.sent = 0  # frame messages sent: whole frames and tiles
        self.tiled = 0  # frames sent as tiles
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
            if not self._taken.wait_for(lambda: self._mailbox is None and not self._tiles, timeout_s):
                return False
            self._mailbox = (header, frame)
        self._wake()
        return True

    def withdraw(self, acquisition: str) -> list[FrameHeader]:
        """Take back what of this acquisition still waits for a worker (at the end of its run): the frame in the
        mailbox, and a frame whose tiles have not all gone out (its result cannot be whole)."""
        withdrawn = []
        with self._lock:
            if self._tiles and self._tiles[0][0].acquisition == acquisition:
                withdrawn.append(self._tiles[0][0])
                self._tiles.clear()
            if self._mailbox is not None and self._mailbox[0].acquisition == acquisition:
                withdrawn.append(self._mailbox[0])
                self._mailbox = None
            self._taken.notify_all()
        self.replaced += len(withdrawn)
        return withdrawn

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
                frames, request = decode_ready(rest[0])
            except MalformedMessage as e:
                self.malformed[e.reason] += 1
                continue
            if self._served.get(identity) == request:
                continue  # a repeat of a request already answered: the worker has (or will have) those frames
            self._credits[identity] = frames  # what it can take now (a repeat asks again, it does not add)
            self._requests[identity] = request
            self._credits.move_to_end(identity)  # served after those waiting longer

    def _send_waiting(self) -> None:
        while self._credits:
            with self._lock:
                if self._tiles:
                    header, frame = self._tiles.popleft()
                    if not self._tiles:
                        self._taken.notify_all()
                elif self._mailbox is None:
                    return
                else:
                    (header, frame), self._mailbox = self._mailbox, None
                    if self._tiler is None:
                        self._taken.notify_all()
            if header.tile is None and self._tiler is not None:
                try:
                    tiles = self._tiler.cut(header, frame)  # outside the lock: publish never waits for it
                except Exception:  # the sender thread must live on: the frame goes whole
                    log.exception("frame %d could not be cut into tiles; sent whole", header.seq)
                    tiles = None
                if tiles is not None:
                    with self._lock:
                        self._tiles.extend(tiles)
                    self.tiled += 1
                    continue
                with self._lock:
                    self._taken.notify_all()
            self._send(header, frame)

    def _send(self, header: FrameHeader, frame: np.ndarray) -> None:
        """To the worker that has waited longest; one that vanished is forgotten and the next one tried."""
        ref = None
        if self.ring is not None and header.tile is None and frame.nbytes <= self.ring.slot_bytes:
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
                del self._credits[identity], self._requests[identity]
                continue
            self._served.pop(identity, None)
            self._served[identity] = self._requests[identity]
            if len(self._served) > MAX_WORKERS_REMEMBERED:
                del self._served[next(iter(self._served))]
            self._credits[identity] -= 1
            if self._credits[identity] <= 0:
                del self._credits[identity], self._requests[identity]
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
