"""Hardware: the Micro-Manager core factory and the simulated devices."""

import logging

_root_level = logging.getLogger().level
from smartscope.hardware.core import build_core, check_device_labels  # noqa: E402

# importing pymmcore-plus sets the root logger to DEBUG (its _logger.configure_logging):
# every library's debug output would then flood the daemon's log
logging.getLogger().setLevel(_root_level)

__all__ = ["build_core", "check_device_labels"]
