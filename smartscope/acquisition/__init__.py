"""Acquisition: a useq MDASequence run by pymmcore-plus's MDA runner, steered by the policies.

- `plan`: the sequence checked against the microscope before anything moves;
- `feed`: the events handed to the runner one step ahead (steered timing, hardware-sequenced bursts);
- `engine`: pymmcore-plus's MDAEngine with smartscope's small additions;
- `handler`: each frame stamped, stored and offered to the inference workers;
- `run`: one acquisition's record (counters, result tables, latency statistics, summary).
"""

from smartscope.acquisition.engine import SmartEngine
from smartscope.acquisition.feed import EventFeed
from smartscope.acquisition.handler import FrameCounts, FrameHandler

__all__ = ["EventFeed", "FrameCounts", "FrameHandler", "SmartEngine"]
