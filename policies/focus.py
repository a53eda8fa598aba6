"""Hold focus against drift from the signed defocus the astigmatic PSF reveals.

The localization model reports each emitter's z relative to the focal plane
(the sign comes from the astigmatism). With the labelled structure centred on
the sample's z = 0, the median z of a frame's localizations is the focus
error, so the stage moves by −gain × median z (times the stage direction: +1
when raising the Z drive raises the sample relative to the focal plane, as a
sample stage does; −1 for an objective drive). The stage itself integrates,
so a proportional step already cancels a constant offset; a deadband keeps
the stage still within the noise. Frames still in flight from before a move
(captured at the old Z) are not acted on again, or the loop would overshoot.
"""

from __future__ import annotations

import numpy as np
from typing import Literal

from pydantic import Field

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class FocusParams(PolicyParams):
    gain: float = Field(0.5, gt=0, le=1, description="fraction of the error corrected per step")
    deadband_nm: float = Field(40.0, ge=0)
    min_localizations: int = Field(5, ge=1)
    max_step_nm: float = Field(150.0, gt=0)
    stage_direction: Literal[1, -1] = Field(1, description="+1: +Z raises the sample's measured z")
    settle_frames: int = Field(5, ge=0, description="most frames from before a move to skip")


class Focus(Policy):
    Params = FocusParams
    actuators = ("z_um",)

    def reset(self) -> None:
        self._moved_from_um: float | None = None
        self._skipped = 0

    def propose(self, obs: Observation) -> list[Action]:
        p: FocusParams = self.params
        z_um = obs.state.get("z_um")
        if z_um is None or len(obs.localizations) < p.min_localizations:
            return []
        if self._moved_from_um == z_um and self._skipped < p.settle_frames:
            self._skipped += 1  # captured before our last move took effect
            return []
        median_z_nm = float(np.median(obs.column("z_nm")))
        if abs(median_z_nm) <= p.deadband_nm:
            return []
        step_nm = float(np.clip(-p.stage_direction * p.gain * median_z_nm, -p.max_step_nm, p.max_step_nm))
        self._moved_from_um, self._skipped = z_um, 0
        return [Action("z_um", z_um + step_nm / 1000,
                       f"median emitter z {median_z_nm:+.0f} nm off the focal plane",
                       {"median_z_nm": round(median_z_nm, 1), "n": len(obs.localizations)})]
