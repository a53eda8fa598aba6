"""The acquisition loop: camera sequence → stamp → storage and the worker pool.

Runs the camera in sequence acquisition and, for each frame popped from the
core's buffer, stamps it with the acquisition state at capture (from the
actuator's cache: no device round trips on this path), queues it for storage
(unbounded: storage never drops) and offers it to the workers without
blocking (bounded: inference may drop, and each drop is counted).

Pause (`pause` set): the camera sequence is stopped, the frames already in
the core's buffer are still taken (a restart clears the buffer), and the loop
waits; when `pause` is cleared the sequence restarts for the frames still to
come. No frame is lost: frames saved == frames acquired across pauses.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smartscope.transport.protocol import FrameHeader

if TYPE_CHECKING:
    from collections.abc import Callable

    from pymmcore_plus import CMMCorePlus

    from smartscope.control.actuator import Actuator
    from smartscope.storage.frames import FrameWriter
    from smartscope.transport.protocol import CameraParams
    from smartscope.transport.sockets import FramePublisher


@dataclass
class LoopCounts:
    acquired: int = 0
    published: int = 0
    dropped_inference: int = 0


def run_sequence(
    core: CMMCorePlus,
    *,
    n_frames: int,
    acquisition_id: str,
    actuator: Actuator,
    camera: CameraParams,
    writer: FrameWriter,
    publisher: FramePublisher,
    stop: threading.Event,
    counts: LoopCounts,
    pause: threading.Event | None = None,
    on_pause: Callable[[bool], None] | None = None,
) -> LoopCounts:
    """Acquire n_frames (or until `stop`), updating `counts` as frames flow.

    `pause` (optional): while it is set the camera is stopped. `on_pause(True)`
    is called once the camera has stopped and its buffer is empty,
    `on_pause(False)` just before the sequence restarts.
    """
    exposure_ms = core.getExposure()

    def take() -> None:
        frame = core.popNextImage()
        t_capture_s = time.time()
        state = actuator.snapshot()
        seq = counts.acquired
        counts.acquired += 1
        writer.put(frame, {"frame": seq, "t_s": f"{t_capture_s:.6f}", "exposure_ms": exposure_ms, **state})
        header = FrameHeader(acquisition=acquisition_id, seq=seq, t_capture_s=t_capture_s,
                             shape=frame.shape, dtype=str(frame.dtype), exposure_ms=exposure_ms,
                             camera=camera, **state)
        if publisher.publish(header, frame):
            counts.published += 1
        else:
            counts.dropped_inference += 1

    core.startSequenceAcquisition(n_frames, 0.0, False)
    try:
        while counts.acquired < n_frames and not stop.is_set():
            if pause is not None and pause.is_set():
                core.stopSequenceAcquisition()
                while core.getRemainingImageCount() > 0 and counts.acquired < n_frames:
                    take()  # frames the camera made before it stopped are kept
                if counts.acquired >= n_frames:
                    break
                if on_pause is not None:
                    on_pause(True)
                while pause.is_set() and not stop.is_set():
                    time.sleep(0.01)
                if stop.is_set():
                    break
                if on_pause is not None:
                    on_pause(False)
                core.startSequenceAcquisition(n_frames - counts.acquired, 0.0, False)
                continue
            if core.getRemainingImageCount() == 0:
                if not core.isSequenceRunning() and core.getRemainingImageCount() == 0:
                    break  # the camera stopped on its own (error or external stop)
                time.sleep(0.0005)
                continue
            take()
    finally:
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
    return counts
