"""The Policy contract: what a policy sees, what it may propose, how it fails.

Lifecycle
    The engine builds each policy once from its validated `Params`, calls
    `reset()` at the start of every acquisition, then `propose(obs)` once per
    inference result, in the order results arrive (frames may be missing: the
    inference stream is allowed to drop them, so count frames by `obs.seq`,
    not by calls).

What a policy sees
    `Observation`: the frame's localizations and counts, the optional model
    outputs (`emitter_count` from a counting model, `event_score` from an
    event model: None when that model does not run), and `state`, the
    actuator values *at the frame's capture*. Results lag the hardware (frames
    in flight), so a policy compares against `obs.state`, never against what
    it asked for last: a frame captured before its move still shows the old
    value. Time is `obs.t_capture_s` (seconds, the daemon's clock).

What a policy may do
    Return `Action`s (absolute values, one per actuator, with a reason in
    words and the inputs it used) or [] for "no change". A policy never
    touches the core: the engine arbitrates (the policy listed first in the
    config wins an actuator), clamps to the safety envelope (range, step,
    rate, speed), applies through the one actuator door and logs the value
    before, requested and applied. A request may therefore be applied
    partially or not at all; the next observation's `state` shows what was.

Safe hold
    While inference is stale or missing the engine does not call `propose` at
    all and applies nothing; controller state is kept, and the first fresh
    result after the hold is a normal call.

Failure path
    An exception raised by `propose` is logged as a decision with outcome
    "error" and the policy's actions for that frame are dropped; the engine
    and the other policies carry on. A policy whose input is missing (e.g. no
    event score) returns [].

Run-time changes
    `update_params` validates the merged parameters with the policy's pydantic
    `Params` and swaps them in as one step, or raises and changes nothing;
    `enabled` is the engine's. Neither resets controller state.

To add a policy: drop a module in `policies/` (or anywhere importable) that
defines one `Policy` subclass, and name its import path in the config.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from smartscope.transport.protocol import LOCALIZATION_COLUMNS

ACTUATORS = ("activation_mw", "excitation_mw", "z_um", "interval_ms", "angle_deg")


@dataclass(frozen=True)
class Observation:
    """One inference result with the acquisition state at its frame's capture."""

    seq: int
    t_capture_s: float
    n_emitters: int
    localizations: np.ndarray  # (N, 7) float, columns LOCALIZATION_COLUMNS
    background_photons: float | None
    state: dict[str, float | None]  # actuator values at capture, keys in ACTUATORS
    field_area_um2: float
    event_score: float | None = None  # 0..1 when an event model runs, else None
    emitter_count: float | None = None  # emitters in the frame from a counting model, else None
    index: dict[str, int] = field(default_factory=dict)  # the frame's MDA index: t, p, g, c, z

    @property
    def emitters_per_um2(self) -> float:
        """Localizations per µm² of the field."""
        return self.n_emitters / self.field_area_um2 if self.field_area_um2 > 0 else 0.0

    def column(self, name: str) -> np.ndarray:
        return self.localizations[:, LOCALIZATION_COLUMNS.index(name)]


@dataclass(frozen=True)
class Action:
    """A proposed absolute value for one actuator, with the reason in words."""

    actuator: str
    value: float
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.actuator not in ACTUATORS:
            raise ValueError(f"unknown actuator {self.actuator!r}; one of {ACTUATORS}")
        if not np.isfinite(self.value):
            raise ValueError(f"non-finite value for {self.actuator}")


class PolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Policy(ABC):
    """Base class of every policy; subclasses set `Params` and `actuators`."""

    Params: ClassVar[type[PolicyParams]] = PolicyParams
    actuators: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: PolicyParams | dict[str, Any] | None = None) -> None:
        self.name = name
        self.params = self.Params.model_validate(params or {})
        self.reset()

    @classmethod
    def card_defaults(cls, cards: dict[str, dict[str, Any]], configured: dict[str, Any]) -> dict[str, Any]:
        """Parameters that the running models' cards set when the config does not (`configured`):
        a threshold measured with the model belongs to that model, not to a default written
        before it was trained. `cards`: each model's card by its `inference` field (model,
        counting_model, event_model). The base class takes none."""
        return {}

    def update_params(self, changes: dict[str, Any]) -> None:
        """Validate the merged parameters first, then swap them in as one step."""
        merged = {**self.params.model_dump(), **changes}
        self.params = self.Params.model_validate(merged)

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Forget controller state (integrators, history) before a new acquisition."""

    @abstractmethod
    def propose(self, obs: Observation) -> list[Action]:
        """Actions for this observation (absolute values), or [] for no change."""


def load_policy_class(module_path: str) -> type[Policy]:
    """The single Policy subclass defined in a module (or `module:Class`)."""
    module_name, _, class_name = module_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import policy module {module_name!r}: {e}") from e
    if class_name:
        cls = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Policy)):
            raise ValueError(f"{module_path!r} is not a Policy subclass")
        return cls
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Policy) and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise ValueError(f"module {module_name!r} must define exactly one Policy subclass, found {len(found)}")
    return found[0]
