"""The shipped policies: each controller's direction, limits and bookkeeping, on hand-made observations."""

from __future__ import annotations

import numpy as np
import pytest

from policies.focus import Focus
from policies.frame_rate import FrameRate
from policies.illumination import Illumination
from policies.view_angle import ViewAngle
from smartscope.config import PolicySpec
from smartscope.control import Observation, build_policies, load_policy_class
from smartscope.control.policy import LOCALIZATION_COLUMNS


def obs(seq=0, n=10, state=None, locs=None, event=None, t_s=None, count=None) -> Observation:
    state = {"activation_mw": 50.0, "excitation_mw": 50.0, "z_um": 0.0, "interval_ms": 20.0,
             "angle_deg": 0.0, **(state or {})}
    locs = np.zeros((n, len(LOCALIZATION_COLUMNS))) if locs is None else locs
    return Observation(seq=seq, t_capture_s=seq * 0.02 if t_s is None else t_s, n_emitters=len(locs),
                       localizations=locs, background_photons=20.0, state=state, field_area_um2=40.96,
                       event_score=event, emitter_count=count)


def locs_with(z_nm=0.0, p=0.95, n=20) -> np.ndarray:
    a = np.zeros((n, len(LOCALIZATION_COLUMNS)))
    a[:, LOCALIZATION_COLUMNS.index("z_nm")] = z_nm
    a[:, LOCALIZATION_COLUMNS.index("p")] = p
    return a


def test_every_shipped_module_defines_one_policy():
    for module in ("policies.illumination", "policies.focus", "policies.frame_rate", "policies.view_angle"):
        assert load_policy_class(module).__module__ == module


# -- illumination ---------------------------------------------------------------------

def illumination(**params) -> Illumination:
    return Illumination("illumination", {"set_point_emitters": 15, "control_period_s": 0.0, "min_frames": 1,
                                         **params})


def test_illumination_raises_power_when_too_few_and_lowers_when_too_many():
    pol = illumination()
    (up,) = pol.propose(obs(n=3))
    assert up.actuator == "activation_mw" and up.value > 50.0
    pol.reset()
    (down,) = pol.propose(obs(n=40))
    assert down.value < 50.0
    pol.reset()
    assert pol.propose(obs(n=15)) == []  # inside the deadband: the laser stays


def test_illumination_averages_over_its_control_period():
    pol = illumination(control_period_s=0.1, min_frames=3)
    assert pol.propose(obs(seq=0, n=3)) == []
    assert pol.propose(obs(seq=1, n=27)) == []
    assert pol.propose(obs(seq=5, n=15)) == []  # mean 15 over 0.1 s: on the set point


def test_illumination_does_not_wind_up_at_its_maximum():
    """Saturated at max power for many periods with too few emitters; the first period with too many
    lowers the power at once (no integrator to unwind)."""
    pol = illumination(max_power_mw=100.0)
    for seq in range(50):
        actions = pol.propose(obs(seq=seq, n=1, state={"activation_mw": 100.0}))
        assert all(a.value <= 100.0 for a in actions)
    pol.propose(obs(seq=50, n=1, state={"activation_mw": 99.0}))  # the power shows: settled
    (down,) = pol.propose(obs(seq=51, n=40, state={"activation_mw": 100.0}))
    assert down.value < 100.0


def test_illumination_waits_for_frames_at_the_new_power():
    pol = illumination(settle_frames=3)
    (a,) = pol.propose(obs(seq=0, n=3, state={"activation_mw": 50.0}))
    for seq in (1, 2, 3):  # still captured at 50 mW: in flight before the change
        assert pol.propose(obs(seq=seq, n=3, state={"activation_mw": 50.0})) == []
    assert pol.propose(obs(seq=4, n=3, state={"activation_mw": a.value}))


def test_illumination_input_is_selectable():
    pol = illumination(signal="counting_model")
    assert pol.propose(obs(n=40, count=None)) == []  # no counting model running: no action
    (a,) = pol.propose(obs(n=40, count=5.0))  # the model's count rules, not the localizations
    assert a.value > 50.0 and a.inputs["signal"] == "counting_model"
    density = Illumination("i", {"set_point_per_um2": 0.5, "control_period_s": 0.0, "min_frames": 1})
    assert density.set_point(obs()) == pytest.approx(0.5 * 40.96)


def test_illumination_rejects_bad_params_without_changing():
    pol = illumination()
    with pytest.raises(ValueError):
        pol.update_params({"signal": "psychic"})
    assert pol.params.signal == "localizations"


# -- focus -------------------------------------------------------------------------------

def focus(**params) -> Focus:
    return Focus("focus", {"min_localizations": 1, "target_z_nm": 0.0, **params})


def test_focus_moves_the_stage_against_the_error_and_respects_the_deadband():
    pol = focus(kp=0.5, ki=0, deadband_nm=40)
    (a,) = pol.propose(obs(locs=locs_with(200.0), state={"z_um": 1.0}))
    assert a.actuator == "z_um" and a.value == pytest.approx(0.9)
    pol = focus(kp=0.5, ki=0, deadband_nm=40, stage_direction=-1)
    assert pol.propose(obs(locs=locs_with(200.0), state={"z_um": 1.0}))[0].value == pytest.approx(1.1)
    assert focus(deadband_nm=40).propose(obs(locs=locs_with(20.0))) == []


def test_focus_locks_on_the_median_z_it_starts_with():
    pol = focus(reference_frames=5, kp=0.5, ki=0, target_z_nm=None)
    for seq in range(5):
        assert pol.propose(obs(seq=seq, locs=locs_with(120.0))) == []
    assert pol.reference_nm == pytest.approx(120.0)
    assert pol.propose(obs(seq=5, locs=locs_with(125.0))) == []  # within the deadband of the lock
    (a,) = pol.propose(obs(seq=6, locs=locs_with(220.0)))
    assert a.value == pytest.approx(-0.05)


def test_focus_step_is_limited_and_frames_from_before_a_move_are_skipped():
    pol = focus(kp=1.0, ki=0, max_step_nm=100, settle_frames=3)
    assert pol.propose(obs(locs=locs_with(500.0), state={"z_um": 1.0}))[0].value == pytest.approx(0.9)
    for _ in range(3):  # still captured at z = 1.0: in flight before the move
        assert pol.propose(obs(locs=locs_with(500.0), state={"z_um": 1.0})) == []
    assert pol.propose(obs(locs=locs_with(500.0), state={"z_um": 1.0}))  # move refused: act again
    assert pol.propose(obs(locs=locs_with(400.0), state={"z_um": 0.9}))[0].value == pytest.approx(0.8)


def test_focus_pid_terms():
    """step = −(kp·e + ki·Σe + kd·Δe): a constant error grows the step (the integral learns a drift)."""
    pol = focus(kp=0.5, ki=0.2, kd=0.1, deadband_nm=0, settle_frames=0, max_step_nm=1000)
    z, steps = 0.0, []
    for e in (100.0, 100.0, 200.0):
        (a,) = pol.propose(obs(locs=locs_with(e), state={"z_um": z}))
        steps.append(round((a.value - z) * 1000, 6))
        z = a.value
    assert steps == pytest.approx([-70.0, -90.0, -(0.5 * 200 + 0.2 * 400 + 0.1 * 100)])


def test_focus_integral_does_not_wind_up_while_the_step_is_saturated():
    pol = focus(kp=0.5, ki=0.1, deadband_nm=0, settle_frames=0, max_step_nm=100)
    z = 0.0
    for _ in range(20):  # a huge error: every step saturated at 100 nm
        (a,) = pol.propose(obs(locs=locs_with(5000.0), state={"z_um": z}))
        assert a.value - z == pytest.approx(-0.1)
        z = a.value
    assert pol._integral == 0.0
    (a,) = pol.propose(obs(locs=locs_with(-40.0), state={"z_um": z}))  # overshoot: back at once
    assert a.value > z


# -- frame rate -------------------------------------------------------------------------------

def test_frame_rate_hysteresis_and_min_dwell():
    pol = FrameRate("frame_rate", {"upper": 0.8, "lower": 0.5, "min_fast_frames": 3,
                                   "fast_interval_ms": 20, "slow_interval_ms": 200})
    interval = 200.0

    def step(score):
        nonlocal interval
        actions = pol.propose(obs(event=score, state={"interval_ms": interval}))
        for a in actions:
            interval = a.value  # applied at once, seen in the next frame
        return [a.value for a in actions]

    assert step(0.7) == []
    assert step(0.9) == [20]
    assert step(0.6) == []       # between thresholds: stay fast
    assert step(0.1) == []       # below, but min dwell not reached
    assert step(0.1) == [200]
    assert step(None) == []


def test_frame_rate_repeats_a_switch_the_envelope_refused():
    """The switch to fast was rate-limited: the frames still show the slow interval, so it asks again."""
    pol = FrameRate("frame_rate", {"retry_frames": 3})
    slow = {"interval_ms": 100.0}
    assert [a.value for a in pol.propose(obs(seq=0, event=0.9, state=slow))] == [20.0]
    assert pol.propose(obs(seq=1, event=0.9, state=slow)) == []  # may still be in flight
    assert pol.propose(obs(seq=2, event=0.9, state=slow)) == []
    assert [a.value for a in pol.propose(obs(seq=3, event=0.9, state=slow))] == [20.0]
    assert pol.propose(obs(seq=4, event=0.9, state={"interval_ms": 20.0})) == []


def test_frame_rate_starts_slow():
    pol = FrameRate("frame_rate")
    (a,) = pol.propose(obs(event=0.1, state={"interval_ms": 20.0}))
    assert a.value == pol.params.slow_interval_ms


def test_frame_rate_thresholds_come_from_the_event_card_unless_the_config_sets_them():
    """build_policies: the event card's switch_threshold is `upper` and half of it `lower`; a config that
    sets either keeps its own pair; no event model (or a card without a switch) keeps the class defaults."""
    cards = {"event_model": {"switch_threshold": 0.7}}

    def params(configured, cards=cards):
        (slot,) = build_policies([PolicySpec(name="fr", module="policies.frame_rate", params=configured)], cards)
        return slot.policy.params.upper, slot.policy.params.lower, slot.policy.params.slow_interval_ms

    assert params({"slow_interval_ms": 300}) == (0.7, 0.35, 300)
    assert params({"upper": 0.9}) == (0.9, 0.5, 100)
    assert params({"lower": 0.3}) == (0.8, 0.3, 100)
    assert params({}, {}) == params({}, {"event_model": {"threshold": 0.5}}) == (0.8, 0.5, 100)
    with pytest.raises(ValueError, match="lower must be <= upper"):
        params({"upper": 0.2})  # the config's upper with the class's lower: the config's own mistake


def test_frame_rate_params_are_validated_before_they_change():
    pol = FrameRate("frame_rate")
    with pytest.raises(ValueError):
        pol.update_params({"lower": 0.9, "upper": 0.2})
    assert pol.params.upper == 0.8
    pol.update_params({"upper": 0.9})
    assert pol.params.upper == 0.9


# -- view angle -------------------------------------------------------------------------------

def test_view_angle_sweeps_corrects_for_bleaching_and_keeps_the_best():
    """True information: 110 resolved/frame at 30°, 100 at 0°, all fading 5 %/frame (bleaching).
    Measured raw, 0° (seen first) would win; divided by the reference's trend, 30° does."""
    pol = ViewAngle("view_angle", {"candidates_deg": [0, 30], "dwell_frames": 4, "settle_frames": 0})
    info = {0.0: 100.0, 30.0: 110.0}
    angle, moves, raw = 0.0, [], {}
    for seq in range(40):
        resolved = int(round(info[angle] * 0.95**seq))
        raw.setdefault(angle, resolved)
        for a in pol.propose(obs(seq=seq, locs=locs_with(p=0.95, n=resolved), state={"angle_deg": angle})):
            angle = a.value
            moves.append(a.value)
    assert raw[0.0] > raw[30.0]
    assert moves == [30.0, 0.0, 30.0] and angle == 30.0
    assert pol.scores[30.0] > pol.scores[0.0]


def test_view_angle_counts_only_confident_localizations():
    pol = ViewAngle("view_angle", {"min_probability": 0.9})
    locs = np.vstack([locs_with(p=0.95, n=4), locs_with(p=0.6, n=10)])
    assert pol.resolved(obs(locs=locs)) == 4


def test_view_angle_keeps_to_its_rotation_budget():
    pol = ViewAngle("view_angle", {"candidates_deg": [0, 10], "dwell_frames": 1, "settle_frames": 0,
                                   "revisit_frames": 5, "max_explorations": 2})
    angle, explorations_started = 0.0, 0
    for seq in range(200):
        actions = pol.propose(obs(seq=seq, locs=locs_with(n=5), state={"angle_deg": angle}))
        for a in actions:
            angle = a.value
        explorations_started = pol._explorations
    assert explorations_started == 2


def test_view_angle_does_not_flood_the_log_while_the_stage_travels():
    pol = ViewAngle("view_angle", {"candidates_deg": [0, 40], "dwell_frames": 1, "settle_frames": 0,
                                   "retry_frames": 10})
    requests = 0
    for seq in range(30):  # the envelope never lets the stage move
        requests += len(pol.propose(obs(seq=seq, locs=locs_with(n=5), state={"angle_deg": 0.0})))
    assert 2 <= requests <= 4
