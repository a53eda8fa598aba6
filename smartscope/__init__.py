"""smartscope: a smart-microscope control service with closed-loop adaptive acquisition.

Follow a frame through the sub-packages in data-flow order: hardware →
acquisition → storage / transport → inference → control → api.
"""

from smartscope.control.policy import ACTUATORS, Action, Observation, Policy, PolicyParams

__version__ = "0.1.0"
__all__ = ["ACTUATORS", "Action", "Observation", "Policy", "PolicyParams", "__version__"]
