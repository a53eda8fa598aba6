"""Hardware: the Micro-Manager core factory and the simulated devices."""

from smartscope.hardware.core import build_core, check_device_labels

__all__ = ["build_core", "check_device_labels"]
