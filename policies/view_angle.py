"""Choose the view angle that shows the most: sweep candidate angles, then stay (smart rotation).

Information is the number of *resolved* localizations per frame: detections
the network is confident about (p ≥ `min_probability`). A raw count would
reward the wrong angles: far out of focus, an elongated astigmatic blob is
often split into several weak detections, so tilting a thick sample can raise
the raw count while fewer emitters are actually localized.

An exploration measures the current angle first (the reference), sweeps the
candidates in one direction (fewest moves), measures the reference again, and
moves to the best. Each angle is scored over `dwell_frames` frames captured
at that angle once the stage has arrived and `settle_frames` frames have
passed. The dye bleaches during the sweep, which would favour the angles seen
first, so the scores are divided by the reference's trend (interpolated
linearly between the two reference measurements).

The rotation budget: one exploration at the start, then another only after
`revisit_frames` frames at the chosen angle (0: never), at most
`max_explorations` in an acquisition. While the stage travels (the envelope
steps and paces it), the policy repeats its request only when the stage has
moved or every `retry_frames`, so the decision log is not flooded.
"""

from __future__ import annotations

from pydantic import Field

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class ViewAngleParams(PolicyParams):
    candidates_deg: list[float] = Field(
        default_factory=lambda: [-40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0], min_length=1)
    dwell_frames: int = Field(20, ge=1, description="frames scored per angle")
    settle_frames: int = Field(2, ge=0, description="frames skipped after arriving at an angle")
    min_probability: float = Field(0.9, ge=0, le=1, description="a localization counts as resolved above this p")
    revisit_frames: int = Field(0, ge=0, description="frames at the chosen angle before exploring again; 0: never")
    max_explorations: int = Field(3, ge=1, description="explorations per acquisition (the rotation budget)")
    retry_frames: int = Field(10, ge=1, description="repeat a request not yet carried out after this many frames")
    tolerance_deg: float = Field(0.01, gt=0, description="the stage is 'at' an angle within this")


class ViewAngle(Policy):
    Params = ViewAngleParams
    actuators = ("angle_deg",)

    def reset(self) -> None:
        self._plan: list[float] = []  # angles still to measure, in order
        self._measured: list[tuple[float, int, float]] = []  # (angle, mid frame, mean resolved)
        self._frames: list[tuple[int, int]] = []  # (seq, resolved) at the current plan angle
        self._arrived = 0
        self._requested: tuple[float, float, int] | None = None  # target, state then, seq
        self._explorations = 0
        self._chosen: float | None = None
        self._chosen_since: int | None = None
        self.scores: dict[float, float] = {}

    def resolved(self, obs: Observation) -> int:
        return int((obs.column("p") >= self.params.min_probability).sum())

    def _go(self, target: float, angle: float, seq: int, reason: str,
            inputs: dict | None = None) -> list[Action]:
        """Request `target`, unless the same request is still being carried out."""
        if self._requested is not None:
            t, state_then, since = self._requested
            if t == target and angle == state_then and seq - since < self.params.retry_frames:
                return []
        self._requested = (target, angle, seq)
        return [Action("angle_deg", target, reason, inputs or {})]

    def propose(self, obs: Observation) -> list[Action]:
        p: ViewAngleParams = self.params
        angle = obs.state.get("angle_deg")
        if angle is None:
            return []
        if not self._plan:
            if self._chosen is not None:  # holding the chosen angle
                if abs(angle - self._chosen) > p.tolerance_deg:
                    return self._go(self._chosen, angle, obs.seq, f"to the chosen angle {self._chosen:g}°")
                self._chosen_since = obs.seq if self._chosen_since is None else self._chosen_since
                if (not p.revisit_frames or obs.seq - self._chosen_since < p.revisit_frames
                        or self._explorations >= p.max_explorations):
                    return []
            self._start_exploration(angle)
        target = self._plan[0]
        if abs(angle - target) > p.tolerance_deg:
            self._arrived = 0
            return self._go(target, angle, obs.seq, f"exploring: to candidate {target:g}°")
        self._arrived += 1
        if self._arrived <= p.settle_frames:
            return []
        self._frames.append((obs.seq, self.resolved(obs)))
        if len(self._frames) < p.dwell_frames:
            return []
        seqs, counts = zip(*self._frames, strict=True)
        self._measured.append((target, (seqs[0] + seqs[-1]) / 2, sum(counts) / len(counts)))
        self._frames, self._arrived = [], 0
        self._plan.pop(0)
        if self._plan:
            nxt = self._plan[0]
            return self._go(nxt, angle, obs.seq, f"exploring: to candidate {nxt:g}°")
        return self._choose(angle, obs.seq)

    def _start_exploration(self, angle: float) -> None:
        cands = sorted({float(c) for c in self.params.candidates_deg} - {float(angle)})
        if cands and abs(cands[-1] - angle) < abs(cands[0] - angle):
            cands.reverse()  # sweep from the nearer end
        self._plan = [float(angle), *cands, float(angle)]
        self._measured = []
        self._explorations += 1
        self._chosen, self._chosen_since, self._requested = None, None, None

    def _choose(self, angle: float, seq: int) -> list[Action]:
        (ref_a, t0, r0), *middle, (_, t1, r1) = self._measured
        scores = {ref_a: (r0 + r1) / 2}
        for a, t, value in middle:
            trend = r0 + (r1 - r0) * (t - t0) / (t1 - t0) if t1 > t0 else r0
            scores[a] = value * (scores[ref_a] / trend) if trend > 0 else value
        self.scores = scores
        best = max(scores, key=scores.__getitem__)
        self._chosen = best
        return self._go(best, angle, seq,
                        f"best of {len(scores)} angles: {scores[best]:.1f} resolved localizations/frame "
                        f"(reference {ref_a:g}°: {scores[ref_a]:.1f})",
                        {f"{a:g}": round(s, 2) for a, s in sorted(scores.items())})
