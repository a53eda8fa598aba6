"""An acquisition plan (a useq MDASequence) checked against the microscope before any device moves.

`check_plan` walks the plan's events once and refuses, naming the field, a
channel that is not a preset of the channel group, a Z outside the safety
envelope, a stage position outside the configured stage limits, or more
events than a run may hold. A pure time-lapse is checked from its time plan
alone, so a 10⁵-frame SMLM run costs nothing to check.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import useq

from smartscope.acquisition.feed import is_time_lapse

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus

    from smartscope.config import Range
    from smartscope.control.safety import SafetyEnvelope

#: events a multi-dimensional plan may hold (each is checked before the run starts)
MAX_PLAN_EVENTS = 100_000


class PlanError(ValueError):
    """A plan the microscope cannot run; the message names the field."""


@dataclass(frozen=True)
class CheckedPlan:
    sequence: useq.MDASequence  # relative Z anchored at the focus position when the plan was checked
    n_frames: int
    sizes: dict[str, int]  # frames per axis, as useq counts them


def time_lapse(frames: int, interval_ms: float) -> useq.MDASequence:
    """The short form {frames, interval_ms} as the MDASequence it stands for."""
    return useq.MDASequence(time_plan={"interval": interval_ms / 1000, "loops": frames})


def anchor_relative_z(sequence: useq.MDASequence, z_um: float | None) -> useq.MDASequence:
    """A relative z plan with no Z given by a stage position is relative to the focus now (as in
    Micro-Manager's MDA window), not to 0 as useq would take it."""
    plan = sequence.z_plan
    if plan is None or not plan.is_relative or z_um is None:
        return sequence
    if not sequence.stage_positions:
        return sequence.model_copy(update={"stage_positions": [useq.Position(z=z_um)]})
    if all(p.z is not None for p in sequence.stage_positions):
        return sequence
    positions = [p if p.z is not None else p.model_copy(update={"z": z_um}) for p in sequence.stage_positions]
    return sequence.model_copy(update={"stage_positions": positions})


def check_plan(sequence: useq.MDASequence, core: CMMCorePlus, envelope: SafetyEnvelope, *,
               channel_group: str | None, stage_x_um: Range | None, stage_y_um: Range | None) -> CheckedPlan:
    if sequence.time_plan is None and not (sequence.stage_positions or sequence.channels or sequence.z_plan
                                           or sequence.grid_plan):
        raise PlanError("sequence: the plan has no axis; give at least a time_plan, e.g. "
                        "{\"interval\": 0.05, \"loops\": 100}")
    if is_time_lapse(sequence):
        n = sequence.time_plan.num_timepoints()
        if n < 1:
            raise PlanError("sequence.time_plan: the time plan has no time points")
        return CheckedPlan(sequence, n, {"t": n})
    focus = core.getFocusDevice()
    sequence = anchor_relative_z(sequence, core.getPosition(focus) if focus else None)
    if sequence.grid_plan is not None and (pixel_um := core.getPixelSizeUm()):
        # the tiles' size, as pymmcore-plus's engine sets it before the run (checked at the real positions)
        fov = {"fov_width": core.getImageWidth() * pixel_um, "fov_height": core.getImageHeight() * pixel_um}
        sequence = sequence.model_copy(update={"grid_plan": sequence.grid_plan.model_copy(update=fov)})
    presets = set(core.getAvailableConfigs(channel_group)) if channel_group else set()
    for i, ch in enumerate(sequence.channels):
        if not channel_group:
            raise PlanError(f"sequence.channels[{i}]: this microscope has no channel group "
                            "(hardware.devices.channel_group)")
        if ch.group != channel_group:
            raise PlanError(f"sequence.channels[{i}].group: {ch.group!r} is not the channel group "
                            f"{channel_group!r}")
        if ch.config not in presets:
            raise PlanError(f"sequence.channels[{i}].config: {ch.config!r} is not a preset of {channel_group!r} "
                            f"(presets: {', '.join(sorted(presets))})")
    z_range = envelope.limits("z_um").range
    n = 0
    for n, event in enumerate(itertools.islice(sequence, MAX_PLAN_EVENTS + 1), start=1):
        if n > MAX_PLAN_EVENTS:
            raise PlanError(f"sequence: more than {MAX_PLAN_EVENTS} events; split the experiment into runs")
        where = ", ".join(f"{k}={v}" for k, v in event.index.items())
        if event.z_pos is not None and not z_range.min <= event.z_pos <= z_range.max:
            raise PlanError(f"sequence: z = {event.z_pos:g} µm at ({where}) is outside the safety envelope "
                            f"[{z_range.min:g}, {z_range.max:g}] (safety.z_um)")
        for axis, value, limits in (("x", event.x_pos, stage_x_um), ("y", event.y_pos, stage_y_um)):
            if value is not None and limits is not None and not limits.min <= value <= limits.max:
                raise PlanError(f"sequence.stage_positions: {axis} = {value:g} µm at ({where}) is outside the "
                                f"stage limits [{limits.min:g}, {limits.max:g}] (safety.stage_{axis}_um)")
    if n == 0:
        raise PlanError("sequence: the plan has no events")
    return CheckedPlan(sequence, n, {str(k): v for k, v in sequence.sizes.items() if v})
