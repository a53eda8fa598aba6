"""Event-driven frame rate (Mahecic et al. 2022): fast while events are likely.

Hysteresis on the event score: go fast above `upper`, go back to slow only
after the score has stayed below `lower` and the minimum fast dwell has
passed. Frames without an event score (no event model loaded) change nothing.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class FrameRateParams(PolicyParams):
    slow_interval_ms: float = Field(200.0, gt=0)
    fast_interval_ms: float = Field(20.0, gt=0)
    upper: float = Field(0.8, ge=0, le=1, description="event score that switches to fast")
    lower: float = Field(0.5, ge=0, le=1, description="score below which slow is allowed")
    min_fast_frames: int = Field(10, ge=0)

    @model_validator(mode="after")
    def _order(self) -> FrameRateParams:
        if self.lower > self.upper:
            raise ValueError("lower must be <= upper (hysteresis)")
        if self.fast_interval_ms > self.slow_interval_ms:
            raise ValueError("fast_interval_ms must be <= slow_interval_ms")
        return self


class FrameRate(Policy):
    Params = FrameRateParams
    actuators = ("interval_ms",)

    def reset(self) -> None:
        self._fast = False
        self._fast_frames = 0

    def propose(self, obs: Observation) -> list[Action]:
        p: FrameRateParams = self.params
        if obs.event_score is None:
            return []
        score = obs.event_score
        if not self._fast and score >= p.upper:
            self._fast, self._fast_frames = True, 0
            return [Action("interval_ms", p.fast_interval_ms, f"event score {score:.2f} >= {p.upper}",
                           {"event_score": score})]
        if self._fast:
            self._fast_frames += 1
            if score < p.lower and self._fast_frames >= p.min_fast_frames:
                self._fast = False
                return [Action("interval_ms", p.slow_interval_ms,
                               f"event score {score:.2f} < {p.lower} after {self._fast_frames} fast frames",
                               {"event_score": score})]
        return []
