"""Event-driven frame rate (Mahecic et al. 2022): fast while events are likely.

Hysteresis on the event score: go fast when it reaches `upper`, go back to
slow only after the score has fallen below `lower` and the minimum fast dwell
(`min_fast_frames` frames at the fast rate) has passed, so one noisy frame
neither starts nor ends a burst. Frames without an event score (no event
model loaded) change nothing.

The thresholds belong to the event model: where the config sets neither,
`upper` is its card's `switch_threshold` (the lowest score with at most 0.5
false objects per minute on the card's validation episodes) and `lower` half
of it, as `smartscope bench policies` measures the policy.

The slow interval is the reaction time: the frame that shows an event was
taken at the slow rate, so each event loses the detector's delay plus up to
two slow periods before frames come fast; a slower slow rate spends less
light between events and catches less of each one (`smartscope bench
policies` prints both sides of that trade-off).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class FrameRateParams(PolicyParams):
    slow_interval_ms: float = Field(100.0, gt=0)
    fast_interval_ms: float = Field(20.0, gt=0)
    upper: float = Field(0.8, ge=0, le=1, description="event score that switches to fast (default: the event "
                         "model card's switch_threshold, else 0.8)")
    lower: float = Field(0.5, ge=0, le=1, description="score below which slow is allowed (default: half the card's "
                         "switch_threshold, else 0.5)")
    min_fast_frames: int = Field(10, ge=0)
    retry_frames: int = Field(5, ge=1, description="repeat a switch not yet seen in the frames after this many")

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

    @classmethod
    def card_defaults(cls, cards: dict[str, Any], configured: dict[str, Any]) -> dict[str, Any]:
        """`upper` the event card's switch_threshold and `lower` half of it, unless the config sets
        either (the two are one hysteresis)."""
        switch = cards.get("event_model", {}).get("switch_threshold")
        if switch is None or {"upper", "lower"} & set(configured):
            return {}
        return {"upper": float(switch), "lower": float(switch) / 2}

    def reset(self) -> None:
        self._fast = False
        self._fast_frames = 0
        self._requested: tuple[float, int] | None = None  # (interval, seq) of the last request

    def propose(self, obs: Observation) -> list[Action]:
        p: FrameRateParams = self.params
        if obs.event_score is None:
            return []
        score = obs.event_score
        reason = None
        if not self._fast and score >= p.upper:
            self._fast, self._fast_frames = True, 0
            reason = f"event score {score:.2f} >= {p.upper}"
        elif self._fast:
            self._fast_frames += 1
            if score < p.lower and self._fast_frames >= p.min_fast_frames:
                self._fast = False
                reason = f"event score {score:.2f} < {p.lower} after {self._fast_frames} fast frames"
        target = p.fast_interval_ms if self._fast else p.slow_interval_ms
        current = obs.state.get("interval_ms")
        if current is not None and abs(current - target) < 1e-9:
            self._requested = None
            return []
        if reason is None:  # the interval is not (yet) what the mode wants: refused, or still in flight
            if self._requested is not None and self._requested[0] == target \
                    and obs.seq - self._requested[1] < p.retry_frames:
                return []
            reason = f"{'fast' if self._fast else 'slow'} mode: interval {current} ms, not yet {target:g} ms"
        self._requested = (target, obs.seq)
        return [Action("interval_ms", target, reason, {"event_score": round(score, 3), "fast": self._fast})]
