"""The policy engine: observations in, checked actions out, every decision logged.

Per inference result: each enabled policy proposes; when two want the same
actuator, the one listed first in the config wins (the other is logged as
overridden); the winner passes the safety envelope (range, step, rate, speed)
and is applied through the actuator, and the decision log records the frame,
the inputs, the value before, the value requested, the value applied and the
reason.

Safe hold: the engine stops acting when inference cannot be trusted to be
current, and says why in `hold_reason` (and `status()`):

- no result for `stale_after_s` (worker gone, crashed or stuck): the caller's
  watchdog (`check_stale`, called periodically) enters the hold;
- a result whose frame was captured more than `stale_after_s` ago (inference
  fallen behind): it is not given to the policies, and the engine holds.

While holding, no policy is asked and nothing at all is applied: the lasers
keep the value they had (never raised), the stage and the rotation stay
still. The hold ends by itself on the next fresh result (captured within the
bound), which is acted on normally. Controller state is kept across a hold.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from smartscope.control.policy import Action, Observation, Policy, load_policy_class

if TYPE_CHECKING:
    from collections.abc import Callable

    from smartscope.config import PolicySpec
    from smartscope.control.actuator import Actuator
    from smartscope.control.decisions import DecisionLog
    from smartscope.control.safety import SafetyEnvelope


@dataclass
class PolicySlot:
    policy: Policy
    module: str
    enabled: bool


def build_policies(specs: list[PolicySpec], cards: dict[str, dict[str, Any]] | None = None) -> list[PolicySlot]:
    """Import and validate every configured policy, its params over the defaults that the running
    models' `cards` give it (`Policy.card_defaults`); ValueError names the bad one."""
    slots, names = [], set()
    for i, spec in enumerate(specs):
        if spec.name in names:
            raise ValueError(f"policies[{i}].name: duplicate policy name {spec.name!r}")
        names.add(spec.name)
        try:
            cls = load_policy_class(spec.module)
            params = {**cls.card_defaults(cards or {}, spec.params), **spec.params}
            slots.append(PolicySlot(cls(spec.name, params), spec.module, spec.enabled))
        except Exception as e:
            raise ValueError(f"policies[{i}] ({spec.name}): {e}") from e
    return slots


class PolicyEngine:
    def __init__(
        self,
        slots: list[PolicySlot],
        envelope: SafetyEnvelope,
        actuator: Actuator,
        log: DecisionLog,
        stale_after_s: float,
    ) -> None:
        self.slots = {s.policy.name: s for s in slots}
        self._order = [s.policy.name for s in slots]
        self._envelope = envelope
        self._actuator = actuator
        self._log = log
        self._stale_after_s = stale_after_s
        self._lock = threading.RLock()
        self._last_result_s: float | None = None
        self.hold_reason: str | None = None
        self.hold_since_s: float | None = None
        self.holds = 0
        self.actions: Counter[str] = Counter()
        #: actuators the running plan sets itself at every event (Z in a z-stack or at positions with Z): a
        #: policy's change is a correction relative to the frame it saw, handed to the callback (actuator,
        #: observation, change) to apply at that position's next event, not a move of the stage now
        self.plan_relative: dict[str, Callable[[str, Observation, float], None]] = {}

    # -- lifecycle -------------------------------------------------------------

    def reset(self, now_s: float | None = None) -> None:
        """Start of an acquisition: fresh controllers, pacing and staleness clocks restarted."""
        with self._lock:
            for slot in self.slots.values():
                slot.policy.reset()
            self._envelope.reset()
            self._last_result_s = time.time() if now_s is None else now_s
            self.hold_reason = None
            self.hold_since_s = None
            self.holds = 0
            self.actions.clear()

    def enter_hold(self, reason: str, now_s: float | None = None, frame: int | None = None) -> None:
        """Stop acting until a fresh result arrives (logged once per hold)."""
        now_s = time.time() if now_s is None else now_s
        with self._lock:
            if self.hold_reason is not None:
                return
            self.hold_reason, self.hold_since_s = reason, now_s
            self.holds += 1
            self._log.append({"t_s": now_s, "frame": frame, "policy": None, "outcome": "hold",
                              "reason": reason})

    def check_stale(self, now_s: float | None = None) -> bool:
        """Watchdog: enter safe hold if results are overdue; True while holding."""
        now_s = time.time() if now_s is None else now_s
        with self._lock:
            if self._last_result_s is not None and self.hold_reason is None:
                age = now_s - self._last_result_s
                if age > self._stale_after_s:
                    self.enter_hold(f"no inference result for {age:.1f}s (> {self._stale_after_s}s)", now_s)
            return self.hold_reason is not None

    def status(self, now_s: float | None = None) -> dict[str, Any]:
        """Hold flag and why, for the API's status."""
        now_s = time.time() if now_s is None else now_s
        with self._lock:
            age = None if self._last_result_s is None else round(now_s - self._last_result_s, 3)
            return {"holding": self.hold_reason is not None, "hold_reason": self.hold_reason,
                    "hold_since_s": self.hold_since_s, "holds": self.holds, "last_result_age_s": age,
                    "stale_after_s": self._stale_after_s}

    # -- the loop ---------------------------------------------------------------

    def on_observation(self, obs: Observation, now_s: float | None = None) -> list[dict[str, Any]]:
        """Act on one inference result; returns the decisions made (none while holding)."""
        now_s = time.time() if now_s is None else now_s
        with self._lock:
            lag_s = now_s - obs.t_capture_s
            if lag_s > self._stale_after_s:
                self.enter_hold(f"inference behind: result for frame {obs.seq} arrived {lag_s:.1f}s "
                                f"after capture (> {self._stale_after_s}s)", now_s, obs.seq)
                return []
            self._last_result_s = now_s
            if self.hold_reason is not None:
                self._log.append({"t_s": now_s, "frame": obs.seq, "policy": None, "outcome": "resume",
                                  "reason": f"fresh inference result after hold ({self.hold_reason})"})
                self.hold_reason = self.hold_since_s = None
            proposals = self._collect(obs, now_s)
            return [self._apply(name, action, obs, now_s, overridden)
                    for name, action, overridden in proposals]

    def _collect(self, obs: Observation, now_s: float) -> list[tuple[str, Action, list[str]]]:
        winners: dict[str, tuple[str, Action, list[str]]] = {}
        available = set(self._actuator.available())
        for name in self._order:
            slot = self.slots[name]
            if not slot.enabled:
                continue
            try:
                actions = slot.policy.propose(obs)
            except Exception as e:  # the contract: log, drop, carry on
                self._log.append({"t_s": now_s, "frame": obs.seq, "policy": name, "outcome": "error",
                                  "reason": f"{type(e).__name__}: {e}"})
                continue
            for action in actions:
                if action.actuator not in available:
                    continue
                if action.actuator in winners:
                    winners[action.actuator][2].append(name)
                else:
                    winners[action.actuator] = (name, action, [])
        return list(winners.values())

    def _apply(self, policy: str, action: Action, obs: Observation, now_s: float,
               overridden: list[str]) -> dict[str, Any]:
        relative = self.plan_relative.get(action.actuator)
        seen = obs.state.get(action.actuator)
        if relative is not None and seen is not None:
            before = seen  # the correction is measured from the frame, and checked as a step from there
        else:
            relative, before = None, self._actuator.snapshot()[action.actuator]
        verdict = self._envelope.check(action.actuator, before, action.value, now_s)
        if verdict.applied is not None and verdict.applied != before:
            if relative is not None:
                relative(action.actuator, obs, verdict.applied - before)
            else:
                self._actuator.write(action.actuator, verdict.applied)
            self._envelope.record_move(action.actuator, now_s, before, verdict.applied)
            self.actions[policy] += 1
        entry = {
            "t_s": now_s,
            "frame": obs.seq,
            "index": obs.index,
            "policy": policy,
            "actuator": action.actuator,
            "inputs": action.inputs,
            "before": before,
            "requested": action.value,
            "applied": verdict.applied,
            "outcome": verdict.outcome,
            "reason": action.reason,
            "envelope": verdict.notes,
            "overridden": overridden,
        }
        self._log.append(entry)
        return entry

    # -- run-time changes (API) -------------------------------------------------

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._lock:
            self.slots[name].enabled = enabled

    def update_params(self, name: str, changes: dict[str, Any]) -> None:
        with self._lock:
            self.slots[name].policy.update_params(changes)
