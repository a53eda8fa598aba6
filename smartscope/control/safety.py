"""The safety envelope: the only arithmetic between a wish and the hardware.

Each actuator has an absolute range, a largest single step and a minimum period
between moves (config `safety`). `SafetyEnvelope.check` turns a requested value
into the value that may be applied now, or refuses it, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smartscope.config import ActuatorLimits, SafetyConfig


@dataclass
class Verdict:
    actuator: str
    before: float | None
    requested: float
    applied: float | None  # None: refused (rate limit)
    notes: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        if self.applied is None:
            return "rate_limited"
        if self.notes:
            return "clamped"
        return "applied"


class SafetyEnvelope:
    def __init__(self, safety: SafetyConfig) -> None:
        self._safety = safety
        self._last_move_s: dict[str, float] = {}

    def limits(self, actuator: str) -> ActuatorLimits:
        return getattr(self._safety, actuator)

    def within_range(self, actuator: str, value: float) -> bool:
        rng = self.limits(actuator).range
        return rng.min <= value <= rng.max

    def check(self, actuator: str, before: float | None, requested: float, now_s: float) -> Verdict:
        """Clamp to range and max step; refuse if the actuator moved too recently."""
        lim = self.limits(actuator)
        verdict = Verdict(actuator, before, requested, None)
        last = self._last_move_s.get(actuator)
        if last is not None and now_s - last < lim.min_period_s:
            verdict.notes.append(f"rate limit: last move {now_s - last:.3f}s ago < {lim.min_period_s}s")
            return verdict
        value = requested
        if lim.max_step is not None and before is not None and abs(value - before) > lim.max_step:
            value = before + (lim.max_step if value > before else -lim.max_step)
            verdict.notes.append(f"step limited to {lim.max_step}")
        clipped = min(max(value, lim.range.min), lim.range.max)
        if clipped != value:
            verdict.notes.append(f"clamped to range [{lim.range.min}, {lim.range.max}]")
        verdict.applied = clipped
        return verdict

    def record_move(self, actuator: str, now_s: float) -> None:
        self._last_move_s[actuator] = now_s
