"""Closed-loop scenarios on the simulated microscope, in one process.

`closed_loop` runs the daemon's acquisition path (pymmcore-plus's MDA runner,
smartscope's engine and event feed) with the shipped models and the real
policy engine acting between frames, on the simulation's clock
(deterministic for a seed); `metrics` scores a run against the simulation's
ground truth. Each scenario module sets up one policy's situation
(bleaching, fission events, drift, a tilted sample), runs it with the policy
and with fixed settings, and scores both. `smartscope bench policies` and
tests/test_policies_closed_loop.py call exactly these.
"""

from smartscope.scenarios.closed_loop import (
    ClosedLoopRun,
    base_config,
    camera_of,
    counting_model_available,
    counting_model_counter,
    event_model_available,
    event_model_scorer,
    live_mode_available,
    run_closed_loop,
    shipped_model,
)
from smartscope.scenarios.focus import drifting_config, focus_scenario
from smartscope.scenarios.frame_rate import FRAME_RATE_PARAMS, frame_rate_scenario, live_config, truth_event_score
from smartscope.scenarios.illumination import (
    ILLUMINATION_FIXED_MW,
    ILLUMINATION_FIXED_MW_COUNTING,
    bleaching_config,
    illumination_scenario,
)
from smartscope.scenarios.metrics import density_error, event_intervals, resolved_truth, rolling_mean, settling_frame
from smartscope.scenarios.view_angle import (
    VIEW_ANGLE_SWEEP_DEG,
    information_at,
    mount_tilt_deg,
    mount_tilted,
    tilted_sample_config,
    view_angle_scenario,
)

__all__ = [
    "FRAME_RATE_PARAMS", "ILLUMINATION_FIXED_MW", "ILLUMINATION_FIXED_MW_COUNTING", "VIEW_ANGLE_SWEEP_DEG",
    "ClosedLoopRun", "base_config", "bleaching_config", "camera_of", "counting_model_available",
    "counting_model_counter", "density_error", "drifting_config", "event_intervals", "event_model_available",
    "event_model_scorer", "focus_scenario", "frame_rate_scenario", "illumination_scenario",
    "information_at", "live_config", "live_mode_available", "mount_tilt_deg", "mount_tilted", "resolved_truth",
    "rolling_mean", "run_closed_loop", "settling_frame", "shipped_model", "tilted_sample_config",
    "truth_event_score", "view_angle_scenario",
]
