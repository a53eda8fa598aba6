"""pymmcore-plus's MDAEngine, with what smartscope needs of it and nothing more.

The runner is fed from an `EventFeed` (an iterator), so pymmcore-plus hands
`setup_sequence` a placeholder sequence; the engine sets up the real plan
instead (`plan`), so grid plans get the camera's field of view and the
summary metadata describes the experiment. Stage moves made by the plan are
written to the actuator's cache (XY read once at the start, then from the
plan: no stage round trip per frame), so frames are stamped with the
position the plan set and the focus policy steps from there.

Focus corrections are kept per stage position, the way pymmcore-plus keeps
hardware-autofocus corrections (added to every Z the plan sets at that
position): a focus policy's move at position p shifts p's later frames, and
no other position's.

A stage that refuses a move, or a channel preset that cannot be set, ends
the run (the daemon then sets the lasers safe and marks it errored), where
pymmcore-plus would log a warning and image on at the wrong field or with
the wrong light, labelled as the plan says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pymmcore_plus.mda import MDAEngine

if TYPE_CHECKING:
    import useq
    from pymmcore_plus import CMMCorePlus
    from pymmcore_plus.metadata import SummaryMetaV1

    from smartscope.control.actuator import Actuator


class SmartEngine(MDAEngine):
    def __init__(self, core: CMMCorePlus, actuator: Actuator, z_range_um: tuple[float, float] | None = None) -> None:
        # restore_initial_state off: the policies' focus and the lasers are the run's own state
        super().__init__(core, restore_initial_state=False)
        self.plan: useq.MDASequence | None = None
        self._actuator = actuator
        self._z_range_um = z_range_um  # the safety envelope's Z: a plan's Z plus its corrections stays inside

    def setup_sequence(self, sequence: useq.MDASequence) -> SummaryMetaV1 | None:
        meta = super().setup_sequence(self.plan if self.plan is not None else sequence)
        if self.mmcore.getXYStageDevice():
            x_um, y_um = self.mmcore.getXYPosition()
            self._actuator.note("x_um", x_um)
            self._actuator.note("y_um", y_um)
        if not self.mmcore.getShutterDevice():
            # no shutter to close between snaps (the simulated microscope's lasers are camera-triggered);
            # pymmcore-plus would call setShutterOpen("") and fail
            self._autoshutter_was_set = False
        return meta

    def correct_focus(self, position: int | None, delta_um: float) -> None:
        """Add a focus correction (µm) for one stage position's later frames (its Z from the plan + corrections).

        `position`: the event's p index, None in a plan without positions (pymmcore-plus's key for both).
        """
        self._z_correction[position] = self._z_correction.get(position, 0.0) + delta_um

    def _set_event_z(self, event: useq.MDAEvent) -> None:
        """The plan's Z plus the position's corrections (autofocus, focus policy), kept inside the envelope."""
        if not self.mmcore.getFocusDevice() or self._z_range_um is None:
            return super()._set_event_z(event)
        z_um = event.z_pos + self._z_correction.setdefault(event.index.get("p", None), 0.0)
        low_um, high_um = self._z_range_um
        self.mmcore.setZPosition(min(max(z_um, low_um), high_um))

    def _set_event_xy_position(self, event: useq.MDAEvent) -> None:
        """Move the XY stage where the plan says; a refusal raises (see the module docstring)."""
        if (event.x_pos is None and event.y_pos is None) or not self.mmcore.getXYStageDevice():
            return super()._set_event_xy_position(event)  # nothing to move, or no stage (logged there)
        x_um, y_um = event.x_pos, event.y_pos
        if x_um is None or y_um is None:
            now_x, now_y = self.mmcore.getXYPosition()
            x_um, y_um = now_x if x_um is None else x_um, now_y if y_um is None else y_um
        self.mmcore.setXYPosition(x_um, y_um)

    def _set_event_channel(self, event: useq.MDAEvent) -> None:
        """Set the event's channel preset; a failure raises (see the module docstring)."""
        if event.channel is not None and (event.channel.group, event.channel.config) != self.mmcore._last_config:  # noqa: SLF001
            self.mmcore.setConfig(event.channel.group, event.channel.config)

    def setup_event(self, event: useq.MDAEvent) -> None:
        super().setup_event(event)
        for name, value in (("x_um", event.x_pos), ("y_um", event.y_pos)):
            if value is not None and self.mmcore.getXYStageDevice():
                self._actuator.note(name, value)
        if event.z_pos is not None and self.mmcore.getFocusDevice():
            self._actuator.note("z_um", self.mmcore.getZPosition())
