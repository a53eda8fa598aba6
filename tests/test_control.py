"""Safety envelope and policy engine: the envelope holds for any proposals; safe hold; arbitration."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartscope.config import SafetyConfig, SmartscopeConfig
from smartscope.control import (
    ACTUATORS,
    Action,
    Actuator,
    DecisionLog,
    Observation,
    Policy,
    PolicyEngine,
    SafetyEnvelope,
    build_policies,
)
from smartscope.control.engine import PolicySlot
from smartscope.hardware import build_core
from smartscope.transport.protocol import LOCALIZATION_COLUMNS


def obs(seq=0, n=10, state=None, locs=None, event=None, t_s=0.0) -> Observation:
    state = {"activation_mw": 50.0, "excitation_mw": 50.0, "z_um": 0.0, "interval_ms": 20.0,
             "angle_deg": 0.0, **(state or {})}
    locs = np.zeros((n, len(LOCALIZATION_COLUMNS))) if locs is None else locs
    return Observation(seq=seq, t_capture_s=t_s, n_emitters=n, localizations=locs, background_photons=20.0,
                       state=state, field_area_um2=40.96, event_score=event)


def limits_of(safety: SafetyConfig, name: str) -> dict:
    return safety.model_dump()[name]


# -- safety envelope ---------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["activation_mw", "z_um", "angle_deg", "interval_ms"]),
                          st.floats(-1e4, 1e4), st.floats(0, 0.5)), min_size=1, max_size=40))
def test_no_applied_value_leaves_the_envelope(moves):
    safety = SafetyConfig()
    env = SafetyEnvelope(safety)
    current = {"activation_mw": 0.0, "z_um": 0.0, "angle_deg": 0.0, "interval_ms": 20.0}
    last_move: dict[str, tuple[float, float]] = {}
    t = 0.0
    for name, value, dt in moves:
        t += dt
        v = env.check(name, current[name], value, t)
        lim = limits_of(safety, name)
        if v.applied is None:
            t_last, size = last_move[name]
            speed = lim["max_speed_per_s"]
            assert t - t_last < max(lim["min_period_s"], size / speed if speed else 0.0)
            continue
        assert lim["range"]["min"] <= v.applied <= lim["range"]["max"]
        if lim["max_step"] is not None:
            assert abs(v.applied - current[name]) <= lim["max_step"] + 1e-9
        if name in last_move:
            t_last, size = last_move[name]
            assert t - t_last >= lim["min_period_s"]
            if lim["max_speed_per_s"]:
                assert size <= lim["max_speed_per_s"] * (t - t_last) + 1e-9
        env.record_move(name, t, current[name], v.applied)
        last_move[name] = (t, abs(v.applied - current[name]))
        current[name] = v.applied


def test_envelope_says_why():
    env = SafetyEnvelope(SafetyConfig())
    v = env.check("activation_mw", 290.0, 1000.0, 0.0)
    assert v.applied == 300.0 and v.outcome == "clamped"
    assert any("step limited" in n for n in v.notes) and any("range" in n for n in v.notes)
    env.record_move("activation_mw", 0.0, 290.0, 300.0)
    assert env.check("activation_mw", 300.0, 250.0, 0.01).outcome == "rate_limited"


def test_rotation_speed_limit_paces_large_moves():
    safety = SafetyConfig()
    safety.angle_deg.max_speed_per_s = 10.0  # deg/s
    safety.angle_deg.min_period_s = 0.0
    env = SafetyEnvelope(safety)
    v = env.check("angle_deg", 0.0, 15.0, 0.0)
    assert v.applied == 15.0
    env.record_move("angle_deg", 0.0, 0.0, 15.0)  # 15° at 10°/s: travelling for 1.5 s
    refused = env.check("angle_deg", 15.0, 30.0, 1.0)
    assert refused.applied is None and "speed limit" in refused.notes[0]
    assert env.check("angle_deg", 15.0, 30.0, 1.5).applied == 30.0
    env.reset()
    assert env.check("angle_deg", 15.0, 0.0, 1.6).applied == 0.0


# -- the engine as a whole, for any proposals ------------------------------------------

class FakeActuator:
    """The actuator interface in memory, recording every write with the engine's clock."""

    def __init__(self, state: dict[str, float]) -> None:
        self.state = dict(state)
        self.writes: list[tuple[float, str, float, float]] = []  # (t, name, before, after)
        self.now = 0.0

    def available(self) -> list[str]:
        return list(ACTUATORS)

    def snapshot(self) -> dict[str, float]:
        return dict(self.state)

    def write(self, name: str, value: float) -> None:
        self.writes.append((self.now, name, self.state[name], value))
        self.state[name] = float(value)


class Scripted(Policy):
    """Proposes whatever the test put in `script` for this frame."""

    actuators: ClassVar[tuple[str, ...]] = ACTUATORS

    def reset(self) -> None:
        self.script: list[Action] = []

    def propose(self, o: Observation) -> list[Action]:
        return self.script


proposal = st.tuples(st.integers(0, 2), st.sampled_from(ACTUATORS),
                     st.one_of(st.floats(-1e5, 1e5), st.sampled_from([0.0, 10.0, 300.0, 1e9, -1e9])))
step = st.tuples(
    st.floats(0.0, 0.6),                      # time since the previous step (s)
    st.floats(0.0, 3.0),                      # age of the frame when its result arrives (s)
    st.booleans(),                            # False: no result this step (only the watchdog runs)
    st.lists(proposal, max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=60))
def test_engine_never_applies_outside_the_envelope_or_faster_than_its_limits(steps):
    """Any proposals from any policies, any timing: every applied value is in range, within one
    step of the previous one, and no actuator moves sooner than its rate or speed limit allows;
    nothing at all is applied while the engine holds."""
    safety = SafetyConfig()
    start = {"activation_mw": 20.0, "excitation_mw": 50.0, "z_um": 0.0, "interval_ms": 20.0, "angle_deg": 0.0}
    actuator = FakeActuator(start)
    policies = [Scripted(f"p{i}") for i in range(3)]
    engine = PolicyEngine([PolicySlot(p, "tests", True) for p in policies], SafetyEnvelope(safety),
                          actuator, DecisionLog(), stale_after_s=safety.stale_after_s)
    engine.reset(now_s=0.0)
    t = 0.0
    for seq, (dt, age, delivered, proposals) in enumerate(steps):
        t += dt
        actuator.now = t
        for p in policies:
            p.script = [Action(name, value, "test") for i, name, value in proposals if i == policies.index(p)]
        n_writes = len(actuator.writes)
        if delivered:
            was_holding = engine.hold_reason is not None
            engine.on_observation(obs(seq=seq, t_s=t - age, state=actuator.snapshot()), now_s=t)
            if age > safety.stale_after_s:  # stale result: hold, nothing applied
                assert engine.hold_reason is not None and len(actuator.writes) == n_writes
            elif was_holding:
                assert engine.hold_reason is None  # a fresh result ends the hold
        else:
            engine.check_stale(now_s=t)
            assert len(actuator.writes) == n_writes
    last: dict[str, tuple[float, float]] = {}
    for t_w, name, before, after in actuator.writes:
        lim = limits_of(safety, name)
        assert lim["range"]["min"] <= after <= lim["range"]["max"]
        if lim["max_step"] is not None:
            assert abs(after - before) <= lim["max_step"] + 1e-9
        if name in last:
            t_prev, size_prev = last[name]
            assert t_w - t_prev >= lim["min_period_s"] - 1e-12
            if lim["max_speed_per_s"]:
                assert size_prev <= lim["max_speed_per_s"] * (t_w - t_prev) + 1e-9
        last[name] = (t_w, abs(after - before))


def test_arbitration_first_configured_policy_wins_and_the_other_is_logged():
    actuator = FakeActuator({"activation_mw": 20.0, "excitation_mw": 50.0, "z_um": 0.0, "interval_ms": 20.0,
                             "angle_deg": 0.0})
    a, b = Scripted("first"), Scripted("second")
    log = DecisionLog()
    engine = PolicyEngine([PolicySlot(a, "t", True), PolicySlot(b, "t", True)], SafetyEnvelope(SafetyConfig()),
                          actuator, log, stale_after_s=2.0)
    engine.reset(now_s=0.0)
    a.script = [Action("activation_mw", 30.0, "a wants 30")]
    b.script = [Action("activation_mw", 5.0, "b wants 5"), Action("z_um", 0.1, "b moves z")]
    entries = engine.on_observation(obs(t_s=0.0), now_s=0.01)
    laser = next(e for e in entries if e["actuator"] == "activation_mw")
    assert laser["policy"] == "first" and laser["overridden"] == ["second"] and actuator.state["activation_mw"] == 30
    assert laser["before"] == 20.0 and laser["requested"] == 30.0 and laser["applied"] == 30.0
    assert actuator.state["z_um"] == pytest.approx(0.1)  # no conflict there: b's action applies
    engine.set_enabled("first", False)
    engine.on_observation(obs(t_s=1.0, state={"activation_mw": 30.0}), now_s=1.01)
    assert actuator.state["activation_mw"] == 5.0


# -- engine on real simulated devices -----------------------------------------------

@pytest.fixture
def engine_parts(config: SmartscopeConfig):
    config.hardware.realtime = False
    config.policies = [p for p in config.policies if p.name == "illumination"]
    config.policies[0].params.update({"control_period_s": 0.0, "min_frames": 1})
    core, _ = build_core(config)
    actuator = Actuator(core, config.hardware.devices)
    log = DecisionLog()
    engine = PolicyEngine(build_policies(config.policies), SafetyEnvelope(config.safety), actuator, log,
                          stale_after_s=1.0)
    return core, actuator, log, engine


def test_engine_applies_through_the_core_and_logs(engine_parts):
    core, actuator, log, engine = engine_parts
    actuator.write("activation_mw", 20.0)
    engine.reset(now_s=0.0)
    entries = engine.on_observation(obs(n=0, state={"activation_mw": 20.0}), now_s=0.1)
    (entry,) = [e for e in entries if e["actuator"] == "activation_mw"]
    assert entry["policy"] == "illumination" and entry["applied"] > 20.0
    assert float(core.getProperty("ActivationLaser", "Power_mW")) == pytest.approx(entry["applied"])
    assert engine.actions["illumination"] == 1
    assert log.recent(10)[-1]["frame"] == 0 and log.recent(10)[-1]["before"] == 20.0


def test_engine_holds_when_results_stop_and_resumes(engine_parts):
    core, actuator, log, engine = engine_parts
    actuator.write("activation_mw", 20.0)
    engine.reset(now_s=0.0)
    assert not engine.check_stale(now_s=0.5)
    assert engine.check_stale(now_s=1.5) and "no inference result" in engine.hold_reason
    assert engine.status(now_s=1.5)["holding"]
    # a result about an old frame (inference fallen behind) does not end the hold, and acts on nothing
    assert engine.on_observation(obs(n=0, t_s=0.2, state={"activation_mw": 20.0}), now_s=1.6) == []
    assert engine.hold_reason is not None
    assert float(core.getProperty("ActivationLaser", "Power_mW")) == 20.0  # the laser was not raised
    entries = engine.on_observation(obs(n=0, t_s=1.95, state={"activation_mw": 20.0}), now_s=2.0)
    assert engine.hold_reason is None and entries and entries[0]["applied"] > 20.0
    outcomes = [e["outcome"] for e in log.recent(10)]
    assert outcomes[:2] == ["hold", "resume"] and engine.holds == 1


def test_engine_holds_when_inference_falls_behind(engine_parts):
    _, actuator, _, engine = engine_parts
    engine.reset(now_s=0.0)
    writes = []
    actuator.write = lambda name, value: writes.append((name, value))
    assert engine.on_observation(obs(n=0, t_s=0.0), now_s=1.5) == []  # 1.5 s old > 1.0 s bound
    assert "inference behind" in engine.hold_reason and writes == []
    assert engine.on_observation(obs(n=0, t_s=1.55), now_s=1.6)  # fresh again: acts
    assert engine.hold_reason is None and writes


def test_a_failing_policy_is_logged_and_others_carry_on(engine_parts):
    _, _, log, engine = engine_parts
    engine.reset(now_s=0.0)
    broken = Scripted("broken")

    def boom(_obs):
        raise RuntimeError("broken")

    broken.propose = boom
    engine.slots["broken"] = PolicySlot(broken, "tests", True)
    engine._order.insert(0, "broken")
    entries = engine.on_observation(obs(n=0), now_s=0.1)
    assert any(e["actuator"] == "activation_mw" for e in entries)
    assert any(e["outcome"] == "error" and e["policy"] == "broken" for e in log.recent(10))
