"""An acquisition plan (a useq MDASequence) checked against the microscope before any device moves.

`check_plan` walks the plan's events once and refuses, naming the field, a
channel that is not a preset of the channel group, a Z outside the safety
envelope, a stage position outside the configured stage limits, or more
events than a run may hold. A pure time-lapse is checked from its time plan
alone, so a 10⁵-frame SMLM run costs nothing to check.
"""

from __future__ import annotations

import itertools
import math
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
    sizes: dict[str, int]  # the size of each axis the plan's images span (position sub-sequences included)


def _axis_lengths(sequence: useq.MDASequence) -> dict[str, int]:
    """Each axis' length from the plan's own arithmetic (useq's `sizes` would build every grid position first:
    a 10⁵ x 10⁶ grid is terabytes)."""
    lengths = {"t": sequence.time_plan.num_timepoints() if sequence.time_plan else 1,
               "p": len(sequence.stage_positions) or 1,
               "g": sequence.grid_plan.num_positions() if sequence.grid_plan else 1,
               "c": len(sequence.channels) or 1,
               "z": sequence.z_plan.num_positions() if sequence.z_plan else 1}
    return {axis: int(n) for axis, n in lengths.items()}


def _check_event_count(sequence: useq.MDASequence, where: str = "sequence") -> None:
    """PlanError if the plan holds more than MAX_PLAN_EVENTS events, counted without building one of them
    (positions' sub-sequences counted as nested in their position)."""
    try:
        lengths = _axis_lengths(sequence)
        subs = [(i, pos.sequence) for i, pos in enumerate(sequence.stage_positions) if pos.sequence is not None]
        for i, sub in subs:
            _check_event_count(sub, f"{where}.stage_positions[{i}].sequence")
        per_position = math.prod(n for axis, n in lengths.items() if axis != "p")
        n_events = per_position * (lengths["p"] - len(subs)) + sum(
            per_position * math.prod(_axis_lengths(sub).values()) for _, sub in subs)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError) as e:
        raise PlanError(f"{where}: cannot count the plan's events: {e}") from None
    if n_events > MAX_PLAN_EVENTS:
        shape = " x ".join(f"{n} {axis}" for axis, n in lengths.items() if n > 1) or "1"
        raise PlanError(f"{where}: {n_events} events, more than {MAX_PLAN_EVENTS} ({shape}); split the experiment "
                        "into runs")


def time_lapse(frames: int, interval_ms: float) -> useq.MDASequence:
    """The short form {frames, interval_ms} as the MDASequence it stands for."""
    return useq.MDASequence(time_plan={"interval": interval_ms / 1000, "loops": frames})


def anchor_relative_z(sequence: useq.MDASequence, z_um: float | None) -> useq.MDASequence:
    """A relative z plan (the plan's, or a position's own sub-sequence's) at a position with no Z is relative
    to the focus now (as in Micro-Manager's MDA window), not to 0 as useq would take it."""
    def relative(seq: useq.MDASequence | None) -> bool:
        return seq is not None and seq.z_plan is not None and seq.z_plan.is_relative

    if z_um is None:
        return sequence
    if not sequence.stage_positions:
        return sequence.model_copy(update={"stage_positions": (useq.Position(z=z_um),)}) if relative(sequence) \
            else sequence
    positions = tuple(p.model_copy(update={"z": z_um}) if p.z is None and (relative(sequence) or relative(p.sequence))
                      else p for p in sequence.stage_positions)
    return sequence.model_copy(update={"stage_positions": positions})


def sets_z(sequence: useq.MDASequence) -> bool:
    """The plan sets Z at its events (a z plan, or positions with Z, or positions with their own z plan)."""
    return sequence.z_plan is not None or any(
        p.z is not None or (p.sequence is not None and p.sequence.z_plan is not None) for p in sequence.stage_positions)


def _with_field_of_view(sequence: useq.MDASequence, width_um: float, height_um: float) -> useq.MDASequence:
    """Grid plans (the plan's and its positions' own) with the camera's field of view as the tile size, as
    pymmcore-plus's engine sets it before a run: the plan is checked, and run, at the real positions."""
    fov = {"fov_width": width_um, "fov_height": height_um}
    update: dict = {}
    if sequence.grid_plan is not None:
        update["grid_plan"] = sequence.grid_plan.model_copy(update=fov)
    if any(p.sequence is not None for p in sequence.stage_positions):
        update["stage_positions"] = tuple(
            p if p.sequence is None
            else p.model_copy(update={"sequence": _with_field_of_view(p.sequence, width_um, height_um)})
            for p in sequence.stage_positions)
    return sequence.model_copy(update=update) if update else sequence


def _where(event: useq.MDAEvent) -> str:
    return ", ".join(f"{k}={v}" for k, v in event.index.items())


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
    if pixel_um := core.getPixelSizeUm():
        sequence = _with_field_of_view(sequence, core.getImageWidth() * pixel_um, core.getImageHeight() * pixel_um)
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
    _check_event_count(sequence)
    z_range = envelope.limits("z_um").range
    n_images, last = 0, {}  # images (autofocus events take none); the largest index on each axis
    for n, event in enumerate(itertools.islice(sequence, MAX_PLAN_EVENTS + 1), start=1):
        if n > MAX_PLAN_EVENTS:
            raise PlanError(f"sequence: more than {MAX_PLAN_EVENTS} events; split the experiment into runs")
        if isinstance(event.action, useq.AcquireImage | None):
            n_images += 1
            for axis, i in event.index.items():
                last[str(axis)] = max(last.get(str(axis), 0), i)
        if event.z_pos is not None and not z_range.min <= event.z_pos <= z_range.max:
            raise PlanError(f"sequence: z = {event.z_pos:g} µm at ({_where(event)}) is outside the safety "
                            f"envelope [{z_range.min:g}, {z_range.max:g}] (safety.z_um)")
        for axis, value, limits in (("x", event.x_pos, stage_x_um), ("y", event.y_pos, stage_y_um)):
            if value is not None and limits is not None and not limits.min <= value <= limits.max:
                raise PlanError(f"sequence.stage_positions: {axis} = {value:g} µm at ({_where(event)}) is outside "
                                f"the stage limits [{limits.min:g}, {limits.max:g}] (safety.stage_{axis}_um)")
    if n_images == 0:
        raise PlanError("sequence: the plan takes no image")
    return CheckedPlan(sequence, n_images, {axis: i + 1 for axis, i in last.items()})
