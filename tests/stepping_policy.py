"""A test policy: one focus step of +0.2 µm, on the first frame it sees of one position from one time point on."""

from __future__ import annotations

from smartscope.control.policy import Action, Observation, Policy, PolicyParams


class StepParams(PolicyParams):
    position: int = 1
    from_t: int = 1
    step_um: float = 0.2


class FocusStep(Policy):
    Params = StepParams
    actuators = ("z_um",)

    def reset(self) -> None:
        self._done = False

    def propose(self, obs: Observation) -> list[Action]:
        p: StepParams = self.params
        if self._done or obs.index.get("p") != p.position or obs.index.get("t", 0) < p.from_t:
            return []
        self._done = True
        return [Action("z_um", obs.state["z_um"] + p.step_um, f"one step at position {p.position}")]
