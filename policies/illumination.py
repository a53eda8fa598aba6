"""Hold the emitters per frame at a set point with the activation laser (ALICA class).

A PI controller in velocity form: each result moves the activation power by
kp·Δerror + ki·error from the power that was actually set when the frame was
captured. Because it starts from the real (clamped) value, an envelope or
saturation limit cannot wind the integrator up. A deadband around the set
point keeps the laser still when the count is close enough, and an
exponential moving average tames the shot noise of single-frame counts.
"""

from __future__ import annotations

from pydantic import Field

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class IlluminationParams(PolicyParams):
    set_point_emitters: float = Field(15.0, gt=0, description="emitters per frame to hold")
    kp_mw_per_emitter: float = Field(1.0, ge=0)
    ki_mw_per_emitter: float = Field(0.3, ge=0, description="per result")
    deadband_fraction: float = Field(0.1, ge=0, lt=1)
    smoothing: float = Field(0.3, gt=0, le=1, description="EMA weight of the newest count")
    max_power_mw: float = Field(300.0, gt=0)


class Illumination(Policy):
    Params = IlluminationParams
    actuators = ("activation_mw",)

    def reset(self) -> None:
        self._ema: float | None = None
        self._prev_error: float | None = None

    def propose(self, obs: Observation) -> list[Action]:
        p: IlluminationParams = self.params
        power = obs.state.get("activation_mw")
        if power is None:
            return []
        self._ema = obs.n_emitters if self._ema is None else (
            p.smoothing * obs.n_emitters + (1 - p.smoothing) * self._ema)
        error = p.set_point_emitters - self._ema
        prev = error if self._prev_error is None else self._prev_error
        self._prev_error = error
        if abs(error) <= p.deadband_fraction * p.set_point_emitters:
            return []
        target = power + p.kp_mw_per_emitter * (error - prev) + p.ki_mw_per_emitter * error
        target = min(max(target, 0.0), p.max_power_mw)
        if abs(target - power) < 1e-3:
            return []
        return [Action("activation_mw", target,
                       reason=f"{self._ema:.1f} emitters/frame vs set point {p.set_point_emitters:g}",
                       inputs={"n_emitters": obs.n_emitters, "ema": round(self._ema, 2),
                               "error": round(error, 2)})]
