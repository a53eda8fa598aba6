"""The simulated microscope's XY stage over a slide of several fields, and its two channels.

Everything goes through the real UniMMCore that `build_core` assembles: the XY
stage moves the field over the slide, the "Channel" group's presets turn the
filter turret, and useq plans with positions and channels run on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import useq
from pydantic import ValidationError
from pymmcore_plus import CMMCorePlus

from smartscope.config import ConfigError, SmartscopeConfig, load_config
from smartscope.hardware import build_core
from smartscope.resources import bundled_path
from smartscope.simulation import FrameTruth, SimulatedMicroscope, SimulationConfig


def _config(slide: tuple[int, int] = (3, 3), size_px: int = 48, **devices: str | None) -> SmartscopeConfig:
    cfg = SmartscopeConfig()
    cfg.hardware.realtime = False
    cfg.hardware.keep_truth = True
    cfg.simulation.camera.width_px = cfg.simulation.camera.height_px = size_px
    cfg.simulation.slide_fields = slide
    for role, label in devices.items():
        setattr(cfg.hardware.devices, role, label)
    return cfg


def _lasers(core: CMMCorePlus, activation_mw: float, excitation_mw: float) -> None:
    core.setProperty("ActivationLaser", "Power_mW", activation_mw)
    core.setProperty("ExcitationLaser", "Power_mW", excitation_mw)


def _snap(core: CMMCorePlus, scope: SimulatedMicroscope) -> tuple[np.ndarray, FrameTruth]:
    core.snapImage()
    return core.getImage().astype(np.float64), scope.truth_log[-1]


def _in_field(scope: SimulatedMicroscope, x_um: float, y_um: float, margin_nm: float = 0.0) -> set[int]:
    """Molecules whose slide position lies in the field with its origin at (x_um, y_um), widened by margin_nm."""
    pos, (fw, fh) = scope.positions_nm, scope.field_nm
    x0, y0 = x_um * 1000.0, y_um * 1000.0
    inside = (
        (pos[:, 0] >= x0 - margin_nm) & (pos[:, 0] < x0 + fw + margin_nm)
        & (pos[:, 1] >= y0 - margin_nm) & (pos[:, 1] < y0 + fh + margin_nm)
    )
    return set(np.flatnonzero(inside).tolist())


def test_default_slide_frames_equal_a_scope_without_the_xy_stage():
    """One field (the default): the XY stage and the filter leave every frame bit-identical."""
    cfg = _config(slide=(1, 1))
    with_stage, _ = build_core(cfg)
    without, _ = build_core(_config(slide=(1, 1), xy_stage=None, channel_group=None))
    assert with_stage.getXYStageDevice() == "XY" and with_stage.getXYPosition() == (0.0, 0.0)
    assert without.getXYStageDevice() == "" and without.getChannelGroup() == ""
    with_stage.setXYPosition(0.0, 0.0)  # the one position a one-field slide has
    with_stage.setConfig("Channel", "SMLM")
    bare = SimulatedMicroscope(cfg.simulation, seed=cfg.hardware.seed)
    bare.activation_mw, bare.excitation_mw = 100.0, 50.0

    cores = {"with": with_stage, "without": without}
    frames: dict[str, list[np.ndarray]] = {"with": [], "without": [], "bare": []}
    for core in cores.values():
        _lasers(core, 100.0, 50.0)
        core.setProperty("Camera", "Interval-ms", 50.0)
    for i in range(30):
        if i == 10:  # a turn of the rotation stage too
            for core in cores.values():
                core.setProperty("Rotation", "Angle_deg", 30.0)
            bare.angle_deg = 30.0
        for name, core in cores.items():
            core.snapImage()
            frames[name].append(core.getImage().copy())
        frames["bare"].append(bare.snap(cfg.acquisition.exposure_ms, 50.0)[0])
    a, b, c = (np.stack(frames[name]) for name in ("with", "without", "bare"))
    assert a.shape == (30, 48, 48) and a.max() > cfg.simulation.camera.offset_adu + 100  # emitters in view
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_one_field_over_shows_other_molecules():
    cfg = _config()
    core, scope = build_core(cfg)
    w_um = scope.field_nm[0] / 1000.0
    assert core.getXYPosition() == (w_um, w_um)  # the stage starts on the slide's centre field
    assert scope.n_molecules > 3 * len(_in_field(scope, w_um, w_um))
    _lasers(core, 200.0, 50.0)

    def look(n: int = 15) -> tuple[np.ndarray, set[int]]:
        frames, ids = [], set()
        for _ in range(n):
            frame, truth = _snap(core, scope)
            assert (truth.stage_x_um, truth.stage_y_um) == core.getXYPosition()
            # truth stays in the frame's coordinates: the slide position less the stage's
            np.testing.assert_allclose(truth.x_nm, scope.positions_nm[truth.id, 0] - truth.stage_x_um * 1000.0)
            np.testing.assert_allclose(truth.y_nm, scope.positions_nm[truth.id, 1] - truth.stage_y_um * 1000.0)
            assert truth.n_emitting == truth.id.size
            frames.append(frame)
            ids |= set(truth.id.tolist())
        return np.stack(frames), ids

    centre_frames, centre_ids = look()
    core.setXYPosition(2 * w_um, w_um)
    right_frames, right_ids = look()
    core.setXYPosition(w_um, w_um)
    back_frames, back_ids = look()

    centre, right = _in_field(scope, w_um, w_um), _in_field(scope, 2 * w_um, w_um)
    assert len(centre_ids) >= 20 and len(right_ids) >= 20 and len(back_ids) >= 20
    assert centre_ids <= centre and back_ids <= centre and right_ids <= right
    assert not centre_ids & right_ids and centre_ids & back_ids
    assert not np.array_equal(centre_frames[-1], right_frames[0])


def test_moving_back_shows_the_same_molecules_exactly():
    """Widefield images every unbleached molecule: the field before and after a round trip is the same image."""
    cfg = _config()
    cfg.simulation.drift.focus_drift_nm_per_s = cfg.simulation.drift.focus_noise_nm = 0.0
    core, scope = build_core(cfg)
    w_um = scope.field_nm[0] / 1000.0
    _lasers(core, 20.0, 50.0)
    core.setConfig("Channel", "Widefield")

    def expected() -> np.ndarray:
        _snap(core, scope)
        return scope.last_expected_photons.copy()

    before = expected()
    core.setXYPosition(w_um, 0.0)
    elsewhere = expected()
    core.setXYPosition(w_um, w_um)
    after = expected()
    assert np.array_equal(before, after)
    assert np.abs(before - elsewhere).max() > 50.0  # photons/px: other filaments


def test_the_lasers_bleach_only_the_field_they_light():
    """Bleach field 0 of a 3 x 1 slide hard: field 2 (beyond the lasers' margin) keeps every molecule."""
    cfg = _config(slide=(3, 1))
    cfg.simulation.drift.focus_drift_nm_per_s = cfg.simulation.drift.focus_noise_nm = 0.0
    cfg.simulation.photophysics.bleach_per_photon = 5e-3
    core, scope = build_core(cfg)
    w_um = scope.field_nm[0] / 1000.0

    def widefield_light(x_um: float) -> np.ndarray:
        core.setXYPosition(x_um, 0.0)
        core.setConfig("Channel", "Widefield")
        _lasers(core, 20.0, 50.0)
        _snap(core, scope)
        return scope.last_expected_photons.copy()

    near_before, far_before = widefield_light(0.0), widefield_light(2 * w_um)
    core.setXYPosition(0.0, 0.0)
    core.setConfig("Channel", "SMLM")
    _lasers(core, 300.0, 100.0)
    for _ in range(150):
        _snap(core, scope)
    assert scope.bleached_fraction > 0.1
    near_after, far_after = widefield_light(0.0), widefield_light(2 * w_um)
    assert near_after.sum() < 0.75 * near_before.sum()
    assert np.array_equal(far_after, far_before)


def test_a_move_off_the_slide_is_refused():
    core, scope = build_core(_config())
    w_um = scope.field_nm[0] / 1000.0
    for x_um, y_um in ((2 * w_um + 0.01, w_um), (-0.01, w_um), (w_um, 3 * w_um), (float("nan"), 0.0)):
        with pytest.raises(ValueError, match=r"would move the field off the slide .* x must be in \[0, 9.6\]"):
            core.setXYPosition(x_um, y_um)
    assert core.getXYPosition() == (w_um, w_um)
    core.setXYPosition(2 * w_um, 0.0)  # the last field of the first row is on the slide
    assert core.getXYPosition() == (2 * w_um, 0.0)

    one_field, _ = build_core(_config(slide=(1, 1)))
    with pytest.raises(ValueError, match="off the slide"):
        one_field.setXYPosition(0.1, 0.0)


def test_channel_group_holds_both_presets_and_turns_the_filter():
    core, scope = build_core(_config())
    assert core.getChannelGroup() == "Channel"
    assert set(core.getAvailableConfigs("Channel")) == {"SMLM", "Widefield"}
    assert core.getCurrentConfig("Channel") == "SMLM" and scope.channel == "smlm"
    core.setConfig("Channel", "Widefield")
    assert core.getProperty("Filter", "Label") == "Widefield-488" and scope.channel == "widefield"
    assert core.getCurrentConfig("Channel") == "Widefield"
    core.setConfig("Channel", "SMLM")
    assert core.getProperty("Filter", "Label") == "SMLM-647" and scope.channel == "smlm"


def test_widefield_is_a_bright_ensemble_image_that_neither_blinks_nor_bleaches():
    cfg = _config()
    core, scope = build_core(cfg)
    _lasers(core, 20.0, 50.0)
    offset = cfg.simulation.camera.offset_adu
    core.setConfig("Channel", "Widefield")
    frame, truth = _snap(core, scope)  # first frame: nothing bleached yet
    w_um = scope.field_nm[0] / 1000.0
    assert truth.channel == "widefield" and truth.id.size == 0  # no single emitters: no blinking
    assert truth.n_emitting == len(_in_field(scope, w_um, w_um)) > 500
    # every molecule in the field gives widefield_photons_per_mw_per_s x 50 mW x 20 ms = 80 photons
    light = (scope.last_expected_photons - truth.background_per_px).sum()
    assert light == pytest.approx(truth.n_emitting * 80.0, rel=0.15)
    widefield_signal = np.mean([_snap(core, scope)[0].mean() - offset for _ in range(5)])

    core.setConfig("Channel", "SMLM")
    smlm = [_snap(core, scope) for _ in range(5)]
    smlm_signal = np.mean([f.mean() - offset for f, _ in smlm])
    assert all(t.channel == "smlm" and t.id.size == t.n_emitting for _, t in smlm)
    assert sum(t.id.size for _, t in smlm) > 0
    assert widefield_signal > 3.0 * smlm_signal

    # widefield frames change no photophysical state: nothing bleaches under them
    bleached = scope.bleached_fraction
    core.setConfig("Channel", "Widefield")
    _lasers(core, 300.0, 100.0)
    for _ in range(20):
        _snap(core, scope)
    assert scope.bleached_fraction == bleached


def test_mda_plan_with_positions_and_channels_runs_on_the_simulated_core():
    core, scope = build_core(_config())
    w_um = scope.field_nm[0] / 1000.0
    _lasers(core, 100.0, 50.0)
    positions = [(0.0, 0.0), (w_um, 2 * w_um)]
    seq = useq.MDASequence(
        stage_positions=positions,
        channels=["SMLM", "Widefield"],
        time_plan={"interval": 0, "loops": 1},
        axis_order="tpc",
    )
    seen = []

    def on_frame(image: np.ndarray, event: useq.MDAEvent, _meta: dict) -> None:
        truth = scope.truth_log[-1]
        seen.append((event.x_pos, event.y_pos, event.channel.config, core.getXYPosition(), truth.channel,
                     truth.stage_x_um, truth.stage_y_um, float(image.mean())))

    core.mda.events.frameReady.connect(on_frame)
    core.mda.run(seq)
    assert len(seen) == 4
    assert [(x, y, ch) for x, y, ch, *_ in seen] == [
        (x, y, ch) for x, y in positions for ch in ("SMLM", "Widefield")
    ]
    for x, y, channel, xy, truth_channel, truth_x, truth_y, _ in seen:
        assert xy == (x, y) == (truth_x, truth_y)
        assert truth_channel == channel.lower()
    means = [m for *_, m in seen]
    assert means[1] > means[0] + 20 and means[3] > means[2] + 20  # widefield frames are the bright ones


def test_real_hardware_roles_are_checked_and_the_demo_config_builds():
    config = load_config(bundled_path("configs") / "hardware-example.yaml")
    core, scope = build_core(config)
    assert scope is None and core.getXYStageDevice() == "XY" and core.getChannelGroup() == "Channel"
    config.hardware.devices.xy_stage = "NoSuchXY"
    with pytest.raises(ConfigError, match=r"hardware.devices.xy_stage: device 'NoSuchXY' is not loaded"):
        build_core(config)
    config.hardware.devices.xy_stage = "XY"
    config.hardware.devices.channel_group = "NoSuchGroup"
    with pytest.raises(ConfigError, match=r"hardware.devices.channel_group: config group 'NoSuchGroup' is not defined"):
        build_core(config)


def test_a_live_sample_is_one_field():
    with pytest.raises(ValidationError, match=r"slide_fields \[2, 2\]: live mode simulates one field"):
        SimulationConfig.model_validate({"mode": "live", "slide_fields": [2, 2]})
    with pytest.raises(ValidationError, match="slide_fields"):
        SimulationConfig.model_validate({"slide_fields": [0, 3]})
