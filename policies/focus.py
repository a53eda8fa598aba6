"""Hold focus against drift from the signed defocus of the astigmatic PSF (focus-lock class).

The localization model reports each emitter's z relative to the focal plane,
with its sign (the astigmatism makes the PSF long in x above focus and long in
y below). The median z of the emitters seen is the focus error up to the
structure's own median height, which stays put while the focus drifts. So,
as a hardware focus lock does, the policy locks on: it takes the median z
over the first `reference_frames` frames as its reference (or a fixed
`target_z_nm`), and from then on moves the Z stage to hold the median z at
that reference.

The controller is a PID on the correction step, run on the localizations
pooled over a control period (frames captured at the current stage position
only):

    e_k  = median z of the pooled localizations − reference              (nm)
    Δz_k = −s · [kp·e_k + ki·Σ_{j≤k} e_j + kd·(e_k − e_{k−1})]

(s = `stage_direction`: +1 when raising the Z drive raises the sample's
measured z, as a sample stage does; −1 for an objective drive.) The stage
integrates the steps, so kp alone already removes a constant offset (it
corrects the fraction kp of the error per period); a steady drift would then
lag by drift-per-period / kp, and the integral term learns the drift rate and
takes that lag away. Errors within `deadband_nm` count as zero (no move,
nothing integrated). A step is at most `max_step_nm`; a step cut to that (or
an integral worth more than one max step) does not integrate further
(conditional-integration anti-windup), and because each step starts from the
stage position at capture, a step the envelope clamped or refused cannot wind
anything up. Frames still in flight from before a move (captured at the old
Z) are skipped, or the loop would act twice on the same error.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class FocusParams(PolicyParams):
    kp: float = Field(0.3, gt=0, le=1, description="fraction of the error corrected per period")
    ki: float = Field(0.03, ge=0, le=1, description="integral gain (per period): learns a steady drift")
    kd: float = Field(0.0, ge=0, description="derivative gain (per period)")
    deadband_nm: float = Field(15.0, ge=0)
    max_step_nm: float = Field(150.0, gt=0)
    target_z_nm: float | None = Field(
        None, description="median z to hold; null: lock on the median z of the first frames")
    reference_frames: int = Field(10, ge=1, description="frames averaged for the lock reference")
    min_localizations: int = Field(40, ge=1, description="localizations pooled before acting")
    control_period_s: float = Field(0.0, ge=0, description="act at most this often (capture time)")
    stage_direction: Literal[1, -1] = Field(1, description="+1: +Z raises the sample's measured z")
    settle_frames: int = Field(5, ge=0, description="most frames from before a move to skip")


class Focus(Policy):
    Params = FocusParams
    actuators = ("z_um",)

    def reset(self) -> None:
        self._reference_z: list[np.ndarray] = []
        self._reference_n = 0
        self.reference_nm: float | None = None
        self._pool: list[np.ndarray] = []
        self._pool_z_um: float | None = None
        self._pool_t0: float | None = None
        self._prev_error: float | None = None
        self._integral = 0.0
        self._moved_from_um: float | None = None
        self._skipped = 0

    def update_params(self, changes: dict) -> None:
        super().update_params(changes)
        if "target_z_nm" in changes:
            self.reference_nm = self.params.target_z_nm

    def propose(self, obs: Observation) -> list[Action]:
        p: FocusParams = self.params
        z_um = obs.state.get("z_um")
        if z_um is None:
            return []
        z_nm = obs.column("z_nm")
        if self.reference_nm is None:
            if p.target_z_nm is not None:
                self.reference_nm = p.target_z_nm
            else:  # locking on: the median z at the focus the user set
                self._reference_z.append(z_nm)
                self._reference_n += 1
                if self._reference_n < p.reference_frames:
                    return []
                pooled = np.concatenate(self._reference_z)
                if pooled.size < p.min_localizations:
                    return []
                self.reference_nm = float(np.median(pooled))
                self._reference_z = []
                return []
        if self._moved_from_um is not None:
            if z_um == self._moved_from_um and self._skipped < p.settle_frames:
                self._skipped += 1  # captured before our last move took effect
                return []
            self._moved_from_um = None
        if self._pool_z_um != z_um:
            self._pool, self._pool_z_um, self._pool_t0 = [], z_um, obs.t_capture_s
        self._pool.append(z_nm)
        n = sum(a.size for a in self._pool)
        if n < p.min_localizations or obs.t_capture_s - self._pool_t0 < p.control_period_s - 1e-9:
            return []
        median_z_nm = float(np.median(np.concatenate(self._pool)))
        frames = len(self._pool)
        self._pool, self._pool_t0 = [], obs.t_capture_s
        error = median_z_nm - self.reference_nm
        if abs(error) <= p.deadband_nm:
            error = 0.0
        prev = error if self._prev_error is None else self._prev_error
        self._prev_error = error
        integral = self._integral + error
        raw_nm = p.kp * error + p.ki * integral + p.kd * (error - prev)
        step_nm = float(np.clip(-p.stage_direction * raw_nm, -p.max_step_nm, p.max_step_nm))
        if abs(raw_nm) <= p.max_step_nm and abs(p.ki * integral) <= p.max_step_nm:
            self._integral = integral  # integrate only while the step is not saturated
        if abs(step_nm) < 0.5:
            return []
        self._moved_from_um, self._skipped = z_um, 0
        return [Action("z_um", round(z_um + step_nm / 1000, 6),
                       f"median emitter z {median_z_nm:+.0f} nm, {error:+.0f} nm off the lock reference",
                       {"median_z_nm": round(median_z_nm, 1), "reference_nm": round(self.reference_nm, 1),
                        "error_nm": round(error, 1), "n": n, "frames": frames})]
