"""Every frame the MDA runner yields: stamped, handed to storage, offered to the workers.

Connected to `core.mda.events.frameReady` (synchronously, in the runner's
thread), so other pymmcore-plus listeners see the same frames. For each
frame it records the acquisition state at capture (the actuator's cache: no
device round trips on this path; XY and Z from the frame's metadata or the
plan), queues the frame for storage (storage never drops) and offers it to
the workers without blocking (the publisher gives it to a worker that asked
for one, or a newer frame replaces it: each frame not sent is counted).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smartscope.acquisition.feed import ORDINAL
from smartscope.transport.protocol import INDEX_AXES, STATE_FIELDS, FrameHeader

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import useq

    from smartscope.control.actuator import Actuator
    from smartscope.storage.frames import FrameWriter
    from smartscope.transport.protocol import CameraParams
    from smartscope.transport.sockets import FramePublisher


@dataclass
class FrameCounts:
    acquired: int = 0
    published: int = 0  # sent to a worker, or waiting in the publisher's mailbox for one
    dropped_inference: int = 0  # not sent (frames_not_sent): replaced by a newer frame while every worker was busy,
    # or a channel not inferred
    delivered: int = -1  # ordinal (in the plan) of the newest frame


class Awaiting:
    """Frames sent to the workers and not answered yet: a result is taken once, for a frame that was sent
    (a forged, replayed or duplicated result finds nothing). Bounded: frames lost without an answer are
    forgotten oldest first beyond MAX_FRAMES."""

    MAX_FRAMES = 1 << 16

    def __init__(self) -> None:
        self._seqs: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, seq: int) -> None:
        with self._lock:
            self._seqs[seq] = None
            if len(self._seqs) > self.MAX_FRAMES:
                self._seqs.popitem(last=False)

    def take(self, seq: int) -> bool:
        with self._lock:
            return self._seqs.pop(seq, False) is None

    def clear(self) -> None:
        with self._lock:
            self._seqs.clear()

    def __len__(self) -> int:
        return len(self._seqs)


class FrameHandler:
    def __init__(self, *, acquisition_id: str, actuator: Actuator, camera: CameraParams, writer: FrameWriter,
                 publisher: FramePublisher, infer_channel: str | None = None,
                 on_frame: Callable[[np.ndarray, dict[str, Any]], None] | None = None,
                 on_storage_error: Callable[[BaseException], None] | None = None) -> None:
        self.counts = FrameCounts()
        self.awaiting = Awaiting()
        self._id = acquisition_id
        self._actuator = actuator
        self._camera = camera
        self._writer = writer
        self._publisher = publisher
        self._on_frame = on_frame
        self._on_storage_error = on_storage_error
        self.storage_error: BaseException | None = None  # the writer's failure, reported once
        self._infer_channel = infer_channel  # None: every frame goes to inference
        #: the largest index reached on each axis (progress per axis)
        self.reached: dict[str, int] = {}
        self.position = 0  # stage position (p) of the newest frame: the field under the objective now

    def frameReady(self, frame: np.ndarray, event: useq.MDAEvent, meta: dict[str, Any]) -> None:  # noqa: N802
        t_capture_s = time.time()
        counts = self.counts
        seq = counts.acquired
        counts.acquired += 1
        counts.delivered = event.metadata.get(ORDINAL, counts.delivered + 1)
        index = {axis: int(event.index.get(axis, 0)) for axis in INDEX_AXES}
        for axis, i in index.items():
            if i > self.reached.get(axis, -1):
                self.reached[axis] = i
        self.position = index["p"]
        state = self._actuator.snapshot()
        position = meta.get("position") or {}
        for axis, plan in (("x", event.x_pos), ("y", event.y_pos), ("z", event.z_pos)):
            value = position.get(axis, plan)
            if value is not None:
                state[f"{axis}_um"] = float(value)
        exposure_ms = float(meta.get("exposure_ms") or event.exposure or 0.0)
        channel = event.channel.config if event.channel is not None else ""
        try:
            if self.storage_error is not None:  # the run is stopping: nothing more to queue, no wait
                raise self.storage_error
            self._writer.put(frame, {"frame": seq, "t_s": f"{t_capture_s:.6f}", **index, "channel": channel,
                                     "exposure_ms": exposure_ms, **state}, event, meta, event.metadata.get(ORDINAL))
        except RuntimeError as e:  # the writer died: say so once (pymmcore-plus would only log a raise here)
            if self.storage_error is None:
                self.storage_error = e
                if self._on_storage_error is not None:
                    self._on_storage_error(e)
        header = FrameHeader(acquisition=self._id, seq=seq, t_capture_s=t_capture_s, shape=frame.shape,
                             dtype=str(frame.dtype), exposure_ms=exposure_ms, camera=self._camera, **index,
                             **{k: state.get(k) for k in STATE_FIELDS})
        if self._infer_channel is None or channel in ("", self._infer_channel):
            self.awaiting.add(seq)  # before the send: a fast worker may answer before publish returns
            counts.published += 1
            self._not_sent(self._publisher.publish(header, frame))
        else:
            counts.dropped_inference += 1
        if self._on_frame is not None:
            self._on_frame(frame, {"frame": seq, **index, "channel": channel})

    def withdraw_waiting(self) -> None:
        """At the end of the run: its frame still waiting for a worker (or for its last tiles to go) will not be
        inferred."""
        for header in self._publisher.withdraw(self._id):
            self._not_sent(header)

    def _not_sent(self, header: FrameHeader | None) -> None:
        """A frame offered to the workers that none took (a newer one replaced it): not sent after all."""
        if header is not None and header.acquisition == self._id and self.awaiting.take(header.seq):
            self.counts.published -= 1
            self.counts.dropped_inference += 1
