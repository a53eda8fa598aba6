"""The safety envelope: the only arithmetic between a wish and the hardware.

Each actuator has (config `safety`, `ActuatorLimits`):

- an absolute range: a request outside it is clamped to the nearest bound;
- a largest single step (`max_step`): a larger request moves by one step;
- a minimum period between moves (`min_period_s`): a request sooner is refused;
- a largest speed (`max_speed_per_s`, e.g. deg/s for the rotation stage): a
  move of size d keeps the actuator "travelling" for d / speed seconds, and a
  request before it has arrived is refused.

`SafetyEnvelope.check` turns a requested value into the value that may be
applied now (or refuses it) and says why; `record_move` tells the envelope
that a value was applied, which starts the pacing clocks. Together they
guarantee, for every sequence of requests, that each applied value lies in
the range, that consecutive applied values differ by at most `max_step`, and
that two moves of one actuator are at least max(min_period_s, d / speed)
apart (d the size of the earlier move).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smartscope.config import ActuatorLimits, SafetyConfig


@dataclass
class Verdict:
    actuator: str
    before: float | None
    requested: float
    applied: float | None  # None: refused (rate or speed limit)
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
        self._busy_until_s: dict[str, float] = {}

    def limits(self, actuator: str) -> ActuatorLimits:
        return getattr(self._safety, actuator)

    def within_range(self, actuator: str, value: float) -> bool:
        rng = self.limits(actuator).range
        return rng.min <= value <= rng.max

    def reset(self) -> None:
        """Forget the pacing clocks (start of an acquisition)."""
        self._last_move_s.clear()
        self._busy_until_s.clear()

    def check(self, actuator: str, before: float | None, requested: float, now_s: float) -> Verdict:
        """Clamp to range and max step; refuse if the actuator moved too recently."""
        lim = self.limits(actuator)
        verdict = Verdict(actuator, before, requested, None)
        last = self._last_move_s.get(actuator)
        if last is not None and now_s - last < lim.min_period_s:
            verdict.notes.append(f"rate limit: last move {now_s - last:.3f}s ago < {lim.min_period_s}s")
            return verdict
        busy_until = self._busy_until_s.get(actuator)
        if busy_until is not None and now_s < busy_until:
            verdict.notes.append(f"speed limit {lim.max_speed_per_s}/s: previous move still travelling "
                                 f"for {busy_until - now_s:.3f}s")
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

    def record_move(self, actuator: str, now_s: float, before: float | None = None,
                    after: float | None = None) -> None:
        """A value was applied at `now_s`: start the rate and speed clocks.

        With the speed limit set, the move's size |after - before| decides how
        long the actuator is travelling; an unknown size counts as the largest
        one the envelope allows (max_step, else the whole range).
        """
        lim = self.limits(actuator)
        self._last_move_s[actuator] = now_s
        if lim.max_speed_per_s is None:
            return
        if before is not None and after is not None:
            size = abs(after - before)
        else:
            size = lim.max_step if lim.max_step is not None else lim.range.max - lim.range.min
        self._busy_until_s[actuator] = now_s + size / lim.max_speed_per_s
