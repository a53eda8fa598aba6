"""The simulated microscope as Micro-Manager Python devices (UniMMCore).

The demo goes through the same Micro-Manager API as real hardware: the camera,
lasers, focus stage, XY stage, filter turret and rotation stage below are
ordinary UniMMCore devices whose setters change the state of one
`SimulatedMicroscope`, and whose camera renders that state's physics.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus.experimental.unicore import (
    CameraDevice,
    GenericDevice,
    StageDevice,
    StateDevice,
    XYStageDevice,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from numpy.typing import DTypeLike

    from smartscope.simulation import SimulatedMicroscope


class SimCamera(CameraDevice):
    """Renders frames from the simulated microscope; optionally in real time."""

    def __init__(self, scope: SimulatedMicroscope, *, realtime: bool = True) -> None:
        super().__init__()
        self._scope = scope
        self._exposure_ms = 20.0
        self._interval_ms = 0.0
        self._realtime = realtime
        self._sequence = 0  # the newest sequence; an older one still running stops at once

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        if exposure <= 0:
            raise ValueError("exposure must be > 0 ms")
        self._exposure_ms = float(exposure)

    def get_interval_ms(self) -> float:
        return self._interval_ms

    def set_interval_ms(self, value: float) -> None:
        """Frame interval; frames come every max(exposure, interval) ms."""
        self._interval_ms = max(0.0, float(value))

    def shape(self) -> tuple[int, int]:
        return self._scope.shape

    def dtype(self) -> DTypeLike:
        return np.uint16

    def _render_into(self, buffer: np.ndarray) -> Mapping:
        frame, truth = self._scope.snap(self._exposure_ms, self._interval_ms)
        buffer[:] = frame
        return {"SimFrame": str(truth.frame)}

    def start_sequence(
        self,
        n: int | None,
        get_buffer: Callable[[Sequence[int], DTypeLike], np.ndarray],
    ) -> Iterator[Mapping]:
        """Frames every max(exposure, interval) in real time, else as fast as they render.

        Why the sequence number: UniMMCore's stop waits 2 s for the acquisition
        thread and then forgets it, and the next start re-arms the shared stop
        event, so a thread still asleep between frames would wake up and run
        on unseen (rendering and holding frames for ever). A sequence that a
        newer one superseded ends at its next check instead, and the pacing
        sleeps in short steps so that it checks often.
        """
        self._sequence += 1
        me = self._sequence
        shape, dtype = self.shape(), self.dtype()
        count = 0
        next_due = time.perf_counter()
        while n is None or count < n:
            if self._realtime:
                while (delay := next_due - time.perf_counter()) > 0 and me == self._sequence:
                    time.sleep(min(delay, 0.05))
                period_s = max(self._exposure_ms, self._interval_ms) / 1000
                next_due = max(next_due + period_s, time.perf_counter() - period_s)
            if me != self._sequence:
                return
            yield self._render_into(get_buffer(shape, dtype))
            count += 1


class SimLaser(GenericDevice):
    """A laser line whose power (mW) sets one attribute of the simulated scope.

    Properties are registered per instance: limits set on a class-level
    `pymm_property` would be shared by every laser (pymmcore-plus 0.18).
    """

    def __init__(self, scope: SimulatedMicroscope, attribute: str, max_mw: float) -> None:
        super().__init__()
        self.register_property(
            name="Power_mW", default_value=0.0, limits=(0.0, float(max_mw)), property_type=float,
            getter=lambda _dev: float(getattr(scope, attribute)),
            setter=lambda _dev, value: setattr(scope, attribute, float(value)),
        )


class SimRotation(GenericDevice):
    """Sample rotation about an in-plane axis (a view-angle stage)."""

    def __init__(self, scope: SimulatedMicroscope, min_deg: float, max_deg: float) -> None:
        super().__init__()
        self.register_property(
            name="Angle_deg", default_value=0.0, limits=(float(min_deg), float(max_deg)), property_type=float,
            getter=lambda _dev: float(scope.angle_deg),
            setter=lambda _dev, value: setattr(scope, "angle_deg", float(value)),
        )


class SimFocus(StageDevice):
    """The objective focus drive (Z, µm)."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self._scope = scope

    def set_position_um(self, val: float) -> None:
        self._scope.stage_z_um = float(val)

    def get_position_um(self) -> float:
        return float(self._scope.stage_z_um)

    def home(self) -> None:
        self._scope.stage_z_um = 0.0

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        raise NotImplementedError("the simulated focus drive has a fixed origin")


class SimXYStage(XYStageDevice):
    """The XY stage (µm): puts the field's origin at its position on the slide.

    A position that would move the field off the slide raises ValueError (the
    simulated slide has edges, as a real stage has travel limits).
    """

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__()
        self._scope = scope

    def set_position_um(self, x: float, y: float) -> None:
        self._scope.move_stage_xy(float(x), float(y))
        self.core.events.XYStagePositionChanged.emit(self.get_label(), float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        return (float(self._scope.stage_x_um), float(self._scope.stage_y_um))

    def home(self) -> None:
        self.set_position_um(0.0, 0.0)

    def stop(self) -> None:
        pass

    def set_origin_x(self) -> None:
        raise NotImplementedError("the simulated XY stage has a fixed origin (the slide's corner)")

    def set_origin_y(self) -> None:
        raise NotImplementedError("the simulated XY stage has a fixed origin (the slide's corner)")


# Filter turret positions (labels as a Micro-Manager config names them) and the
# channel of the simulated microscope each one selects.
FILTER_POSITIONS = {"SMLM-647": "smlm", "Widefield-488": "widefield"}
CHANNEL_PRESETS = {"SMLM": "SMLM-647", "Widefield": "Widefield-488"}  # channel group preset -> position


class SimFilter(StateDevice):
    """The filter turret: its position picks the scope's channel (blinking SMLM or widefield ensemble)."""

    def __init__(self, scope: SimulatedMicroscope) -> None:
        super().__init__(dict(enumerate(FILTER_POSITIONS)))
        self._scope = scope
        self._channels = list(FILTER_POSITIONS.values())

    def get_state(self) -> int:
        return self._channels.index(self._scope.channel)

    def set_state(self, position: int) -> None:
        self._scope.channel = self._channels[int(position)]
