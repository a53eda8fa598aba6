"""Control: policies propose, the engine checks (safety envelope) and applies (actuator)."""

from smartscope.control.actuator import Actuator
from smartscope.control.decisions import DecisionLog
from smartscope.control.engine import PolicyEngine, build_policies
from smartscope.control.policy import ACTUATORS, Action, Observation, Policy, PolicyParams, load_policy_class
from smartscope.control.safety import SafetyEnvelope

__all__ = ["ACTUATORS", "Action", "Actuator", "DecisionLog", "Observation", "Policy", "PolicyEngine",
           "PolicyParams", "SafetyEnvelope", "build_policies", "load_policy_class"]
