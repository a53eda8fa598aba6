"""Safety envelope, policies and engine on a real UniMMCore with simulated devices."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartscope.config import SafetyConfig, SmartscopeConfig
from smartscope.control import Actuator, DecisionLog, Observation, PolicyEngine, SafetyEnvelope, build_policies
from smartscope.hardware import build_core
from policies.focus import Focus
from policies.frame_rate import FrameRate
from policies.illumination import Illumination
from policies.view_angle import ViewAngle


def obs(seq=0, n=10, state=None, locs=None, event=None) -> Observation:
    state = {"activation_mw": 50.0, "excitation_mw": 50.0, "z_um": 0.0, "interval_ms": 20.0,
             "angle_deg": 0.0, **(state or {})}
    locs = np.zeros((n, 6)) if locs is None else locs
    return Observation(seq=seq, t_capture_s=0.0, n_emitters=n, localizations=locs, background_photons=20.0,
                       state=state, field_area_um2=40.96, event_score=event)


# -- safety envelope ---------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["activation_mw", "z_um", "angle_deg", "interval_ms"]),
                          st.floats(-1e4, 1e4), st.floats(0, 0.5)), min_size=1, max_size=40))
def test_no_applied_value_leaves_the_envelope(moves):
    safety = SafetyConfig()
    env = SafetyEnvelope(safety)
    current = {"activation_mw": 0.0, "z_um": 0.0, "angle_deg": 0.0, "interval_ms": 20.0}
    last_move: dict[str, float] = {}
    t = 0.0
    for name, value, dt in moves:
        t += dt
        v = env.check(name, current[name], value, t)
        lim = safety.model_dump()[name]
        if v.applied is None:
            assert t - last_move[name] < lim["min_period_s"]
            continue
        assert lim["range"]["min"] <= v.applied <= lim["range"]["max"]
        if lim["max_step"] is not None:
            assert abs(v.applied - current[name]) <= lim["max_step"] + 1e-9
        if name in last_move:
            assert t - last_move[name] >= lim["min_period_s"]
        current[name] = v.applied
        env.record_move(name, t)
        last_move[name] = t


def test_envelope_says_why():
    env = SafetyEnvelope(SafetyConfig())
    v = env.check("activation_mw", 290.0, 1000.0, 0.0)
    assert v.applied == 300.0 and v.outcome == "clamped"
    assert any("step limited" in n for n in v.notes) and any("range" in n for n in v.notes)
    env.record_move("activation_mw", 0.0)
    assert env.check("activation_mw", 300.0, 250.0, 0.01).outcome == "rate_limited"


# -- policies ------------------------------------------------------------------------

def test_illumination_raises_power_when_too_few_and_lowers_when_too_many():
    pol = Illumination("illumination", {"set_point_emitters": 15})
    up = pol.propose(obs(n=3))
    assert up and up[0].actuator == "activation_mw" and up[0].value > 50.0
    pol.reset()
    down = pol.propose(obs(n=40))
    assert down and down[0].value < 50.0
    pol.reset()
    assert pol.propose(obs(n=15)) == []  # inside the deadband: the laser stays


def test_focus_moves_the_stage_towards_the_emitters():
    pol = Focus("focus", {"gain": 0.5, "deadband_nm": 40})
    locs = np.zeros((20, 6))
    locs[:, 2] = 200.0  # emitters 200 nm above the focal plane
    (a,) = pol.propose(obs(locs=locs, n=20, state={"z_um": 1.0}))
    assert a.actuator == "z_um" and a.value == pytest.approx(0.9)
    locs[:, 2] = 20.0
    assert pol.propose(obs(locs=locs, n=20)) == []


def test_frame_rate_hysteresis_and_min_dwell():
    pol = FrameRate("frame_rate", {"upper": 0.8, "lower": 0.5, "min_fast_frames": 3,
                                   "fast_interval_ms": 20, "slow_interval_ms": 200})
    assert pol.propose(obs(event=0.7)) == []
    assert pol.propose(obs(event=0.9))[0].value == 20
    assert pol.propose(obs(event=0.6)) == []       # between thresholds: stay fast
    assert pol.propose(obs(event=0.1)) == []       # below, but min dwell not reached
    assert pol.propose(obs(event=0.1))[0].value == 200
    assert pol.propose(obs(event=None)) == []


def test_view_angle_explores_then_keeps_the_best():
    pol = ViewAngle("view_angle", {"candidates_deg": [0, 30], "dwell_frames": 2, "revisit_frames": 100})
    counts = {0.0: 5, 30.0: 12}
    angle, chosen = 0.0, []
    for seq in range(12):
        for a in pol.propose(obs(seq=seq, n=counts[angle], state={"angle_deg": angle})):
            angle = a.value
            chosen.append(a.value)
    assert chosen == [30.0, 30.0] and angle == 30.0


def test_policy_params_are_validated_before_they_change():
    pol = FrameRate("frame_rate")
    with pytest.raises(ValueError):
        pol.update_params({"lower": 0.9, "upper": 0.2})
    assert pol.params.upper == 0.8
    pol.update_params({"upper": 0.9})
    assert pol.params.upper == 0.9


# -- engine on real simulated devices -----------------------------------------------

@pytest.fixture
def engine_parts(config: SmartscopeConfig):
    config.hardware.realtime = False
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
    assert log.recent(10)[-1]["frame"] == 0


def test_engine_holds_when_results_stop_and_resumes(engine_parts):
    _, actuator, log, engine = engine_parts
    engine.reset(now_s=0.0)
    assert not engine.check_stale(now_s=0.5)
    assert engine.check_stale(now_s=1.5) and "no inference result" in engine.hold_reason
    engine.on_observation(obs(n=0), now_s=2.0)
    assert engine.hold_reason is None
    outcomes = [e["outcome"] for e in log.recent(10)]
    assert outcomes[:2] == ["hold", "resume"]


def test_a_failing_policy_is_logged_and_others_carry_on(engine_parts):
    _, _, log, engine = engine_parts
    engine.reset(now_s=0.0)

    def boom(_obs):
        raise RuntimeError("broken")

    engine.slots["focus"].policy.propose = boom
    entries = engine.on_observation(obs(n=0), now_s=0.1)
    assert any(e["actuator"] == "activation_mw" for e in entries)
    assert any(e["outcome"] == "error" and e["policy"] == "focus" for e in log.recent(10))


def test_focus_does_not_act_twice_on_frames_from_before_its_move():
    pol = Focus("focus", {"gain": 0.5, "settle_frames": 3})
    locs = np.zeros((20, 6))
    locs[:, 2] = 200.0
    assert pol.propose(obs(locs=locs, n=20, state={"z_um": 1.0}))[0].value == pytest.approx(0.9)
    for _ in range(3):  # still captured at z = 1.0: in flight before the move
        assert pol.propose(obs(locs=locs, n=20, state={"z_um": 1.0})) == []
    assert pol.propose(obs(locs=locs, n=20, state={"z_um": 1.0}))  # move refused? act again after settle_frames
    assert pol.propose(obs(locs=locs, n=20, state={"z_um": 0.9}))[0].value == pytest.approx(0.8)
