"""Acquisition: the camera sequence loop that feeds storage and inference."""

from smartscope.acquisition.loop import LoopCounts, run_sequence

__all__ = ["LoopCounts", "run_sequence"]
