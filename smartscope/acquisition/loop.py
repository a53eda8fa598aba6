"""The acquisition loop: camera sequence → stamp → storage and the worker pool.

Runs the camera in sequence acquisition and, for each frame popped from the
core's buffer, stamps it with the acquisition state at capture (from the
actuator's cache: no device round trips on this path), queues it for storage
(unbounded: storage never drops) and offers it to the workers without
blocking (bounded: inference may drop, and each drop is counted).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smartscope.transport.protocol import FrameHeader

if TYPE_CHECKING:
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
) -> LoopCounts:
    """Acquire n_frames (or until `stop`), updating `counts` as frames flow."""
    exposure_ms = core.getExposure()
    core.startSequenceAcquisition(n_frames, 0.0, False)
    try:
        while counts.acquired < n_frames and not stop.is_set():
            if core.getRemainingImageCount() == 0:
                if not core.isSequenceRunning() and core.getRemainingImageCount() == 0:
                    break  # the camera stopped on its own (error or external stop)
                time.sleep(0.0005)
                continue
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
    finally:
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
    return counts
