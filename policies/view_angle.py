"""Choose the view angle that shows the most: explore a few angles, then stay.

Information here is the number of resolved localizations per frame. The
policy dwells `dwell_frames` at each candidate angle, moves to the best one,
and only re-explores after `revisit_frames` (the rotation budget: rotating
costs time and disturbs the sample).
"""

from __future__ import annotations

from pydantic import Field

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class ViewAngleParams(PolicyParams):
    candidates_deg: list[float] = Field(default_factory=lambda: [0.0, -30.0, 30.0], min_length=1)
    dwell_frames: int = Field(20, ge=1)
    revisit_frames: int = Field(1000, ge=1)


class ViewAngle(Policy):
    Params = ViewAngleParams
    actuators = ("angle_deg",)

    def reset(self) -> None:
        self._scores: dict[float, list[int]] = {}
        self._index = 0
        self._frames_here = 0
        self._since_choice = 0
        self._exploring = True

    def propose(self, obs: Observation) -> list[Action]:
        p: ViewAngleParams = self.params
        angle = obs.state.get("angle_deg")
        if angle is None:
            return []
        if not self._exploring:
            self._since_choice += 1
            if self._since_choice >= p.revisit_frames:
                self.reset()
            return []
        target = p.candidates_deg[self._index]
        if abs(angle - target) > 1e-6:
            return [Action("angle_deg", target, f"exploring candidate {target:g}°")]
        self._scores.setdefault(target, []).append(obs.n_emitters)
        self._frames_here += 1
        if self._frames_here < p.dwell_frames:
            return []
        self._frames_here = 0
        self._index += 1
        if self._index < len(p.candidates_deg):
            nxt = p.candidates_deg[self._index]
            return [Action("angle_deg", nxt, f"exploring candidate {nxt:g}°")]
        means = {a: sum(s) / len(s) for a, s in self._scores.items()}
        best = max(means, key=means.__getitem__)
        self._exploring, self._since_choice = False, 0
        return [Action("angle_deg", best, f"best of {len(means)} angles: {means[best]:.1f} localizations/frame",
                       {f"{a:g}": round(m, 2) for a, m in means.items()})]
