"""The daemon's two sockets: frames out to the worker pool, results back in."""

from __future__ import annotations

import zmq

from smartscope.transport.protocol import FrameHeader, MalformedMessage, Result, decode_result, encode_frame


class FramePublisher:
    """PUSH frames to whichever worker is free; never blocks the caller.

    When every worker's queue (bounded by `hwm`) is full, or no worker is
    connected, the frame is not sent and `dropped` counts it.
    """

    def __init__(self, address: str, hwm: int) -> None:
        self._socket = zmq.Context.instance().socket(zmq.PUSH)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sent = 0
        self.dropped = 0

    def publish(self, header: FrameHeader, frame) -> bool:
        try:
            self._socket.send_multipart(encode_frame(header, frame), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self._socket.close()


class ResultReceiver:
    """PULL results from all workers; malformed ones are counted and dropped."""

    def __init__(self, address: str) -> None:
        self._socket = zmq.Context.instance().socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self.malformed = 0

    def receive(self, timeout_ms: int) -> list[Result]:
        """Every result waiting now (after up to timeout_ms for the first)."""
        results: list[Result] = []
        if not self._poller.poll(timeout_ms):
            return results
        while True:
            try:
                data = self._socket.recv(flags=zmq.NOBLOCK)
            except zmq.Again:
                return results
            try:
                results.append(decode_result(data))
            except MalformedMessage:
                self.malformed += 1

    def close(self) -> None:
        self._socket.close()
