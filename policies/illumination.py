"""Hold the emitters per frame at a set point with the activation laser (ALICA/AutoLase class).

The measured quantity is selectable: the number of localizations in the frame
(`signal: localizations`, always available) or the per-frame emitter count of
a counting model (`signal: counting_model`, `Observation.emitter_count`; the
policy does nothing while that model does not run). The set point is in
emitters per frame, or in emitters per µm² (`set_point_per_um2`, times the
field area).

The controller is a PI in velocity (incremental) form on the logarithm of the
effective activation power, run once per control period:

    e_k   = (set point − mean count over the period) / set point   (clipped to ±1)
    Δu_k  = kp · (e_k − e_{k−1}) + ki · e_k,     u = ln(P + power_offset_mw)

The on-switching rate of a photoswitchable dye is k_base + k·P, so the number
of emitters on is proportional to P + k_base/k: in these coordinates the plant
gain is ≈ 1 whatever the size of the remaining pool, and the same gains work
at the start (large pool, low power) and late in the run (bleached pool, high
power). The pool shrinks steadily as the dye bleaches; the integral term
follows it.

- Anti-windup: the increment is applied to the power *actually set* when the
  frame was captured (`obs.state`), not to an internal integrator, so a power
  held at `max_power_mw`, clamped by the safety envelope or refused by its
  rate limit cannot wind anything up: when the count comes back above the set
  point the power goes down on the next period.
- Deadband: no change while |e| ≤ `deadband_fraction` (the integral is frozen
  too), so the laser is still when the count is close enough.
- Control period: counts are averaged over `control_period_s` of frames
  captured at the current power (frames from before the last change are not
  mixed in), which also keeps the proposals slower than the envelope's rate
  limit. After a change, the policy waits for frames captured at the new power
  (at most `settle_frames` frames) before it acts again.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class IlluminationParams(PolicyParams):
    signal: Literal["localizations", "counting_model"] = Field(
        "localizations", description="what is counted: localizations per frame, or the "
        "counting model's per-frame emitter count (Observation.emitter_count)")
    set_point_emitters: float = Field(15.0, gt=0, description="emitters per frame to hold")
    set_point_per_um2: float | None = Field(
        None, gt=0, description="emitters per µm² to hold; replaces set_point_emitters when set")
    kp: float = Field(0.1, ge=0, description="proportional gain, ln(power) per relative error")
    ki: float = Field(0.2, ge=0, description="integral gain per control period")
    deadband_fraction: float = Field(0.04, ge=0, lt=1, description="|error| / set point left alone")
    control_period_s: float = Field(0.1, ge=0, description="act at most this often (capture time)")
    min_frames: int = Field(3, ge=1, description="fewest frames averaged per control period")
    settle_frames: int = Field(5, ge=0, description="frames to wait for the new power to show")
    power_offset_mw: float = Field(
        15.0, gt=0, description="spontaneous activation as an equivalent power: k_on_base / k_on_per_mw")
    max_power_mw: float = Field(300.0, gt=0)
    min_power_mw: float = Field(0.0, ge=0)


class Illumination(Policy):
    Params = IlluminationParams
    actuators = ("activation_mw",)

    def reset(self) -> None:
        self._sum = 0.0
        self._n = 0
        self._first_t: float | None = None
        self._power: float | None = None  # the power the averaged frames were captured at
        self._prev_error: float | None = None
        self._moved_from: float | None = None
        self._waited = 0

    def set_point(self, obs: Observation) -> float:
        p: IlluminationParams = self.params
        if p.set_point_per_um2 is not None:
            return p.set_point_per_um2 * obs.field_area_um2
        return p.set_point_emitters

    def measure(self, obs: Observation) -> float | None:
        if self.params.signal == "counting_model":
            return obs.emitter_count
        return float(obs.n_emitters)

    def propose(self, obs: Observation) -> list[Action]:
        p: IlluminationParams = self.params
        power = obs.state.get("activation_mw")
        count = self.measure(obs)
        if power is None or count is None:
            return []
        if self._moved_from is not None:
            if power == self._moved_from and self._waited < p.settle_frames:
                self._waited += 1  # captured before our last change took effect
                return []
            self._moved_from = None
        if self._power != power:  # a new power: start a fresh average
            self._sum, self._n, self._first_t, self._power = 0.0, 0, obs.t_capture_s, power
        self._sum += count
        self._n += 1
        if self._n < p.min_frames or obs.t_capture_s - self._first_t < p.control_period_s - 1e-9:
            return []
        mean = self._sum / self._n
        n_frames = self._n
        self._sum, self._n, self._first_t = 0.0, 0, obs.t_capture_s
        set_point = self.set_point(obs)
        error = max(-1.0, min(1.0, (set_point - mean) / set_point))
        prev = error if self._prev_error is None else self._prev_error
        if abs(error) <= p.deadband_fraction:
            self._prev_error = error
            return []
        self._prev_error = error
        du = p.kp * (error - prev) + p.ki * error
        target = (power + p.power_offset_mw) * math.exp(du) - p.power_offset_mw
        target = min(max(target, p.min_power_mw), p.max_power_mw)
        if abs(target - power) < 1e-3:
            return []
        self._moved_from, self._waited = power, 0
        return [Action("activation_mw", round(target, 3),
                       reason=f"{mean:.1f} emitters/frame over {n_frames} frames vs set point {set_point:.3g}",
                       inputs={"signal": p.signal, "mean_emitters": round(mean, 2), "frames": n_frames,
                               "error": round(error, 3), "set_point": round(set_point, 2)})]
