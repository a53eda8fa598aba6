"""Live mode of the simulated microscope: a moving, bleaching, dividing tubular network, in numbers."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.ndimage import map_coordinates, sobel

from smartscope.config import load_config
from smartscope.simulation import (
    EVENT_COLUMNS,
    LiveConfig,
    OpticsConfig,
    SimulatedMicroscope,
    SimulationConfig,
    adu_to_photons,
    astigmatic_sigmas_nm,
    events_table,
    render_dense_psf,
    render_gaussian_psfs,
    truth_table,
)
from smartscope.simulation.export import simulate_to_dir


def _live(size_px: int = 64, **live: float) -> SimulationConfig:
    return SimulationConfig.model_validate(
        {"mode": "live", "camera": {"width_px": size_px, "height_px": size_px}, "live": live}
    )


def _fission_run(seed: int = 2, frames: int = 300) -> tuple[SimulatedMicroscope, list]:
    """Fast fission (1 s constriction, 0.5 s division) imaged every 100 ms."""
    config = _live(fission_rate_per_um_per_s=0.03, constriction_s=1.0, division_s=0.5)
    scope = SimulatedMicroscope(config, seed=seed)
    scope.excitation_mw = 50.0
    shots = []
    for _ in range(frames):
        frame, truth = scope.snap(10.0, 100.0)
        shots.append((frame, scope.last_expected_photons, truth))
    return scope, shots


@pytest.fixture(scope="module")
def fission_run() -> tuple[SimulatedMicroscope, list]:
    return _fission_run()


# ---- rendering -------------------------------------------------------------
def test_dense_renderer_matches_the_pixel_integrated_psf() -> None:
    """The fast (splat + blur per defocus node) renderer against one PSF per point."""
    optics, rng = OpticsConfig(), np.random.default_rng(0)
    n = 2000
    x, y = rng.uniform(-5, 69, n), rng.uniform(-5, 69, n)
    photons = rng.uniform(50, 150, n)
    for z_range_nm in (0.0, 300.0, 2000.0):
        z = rng.uniform(-0.5, 0.5, n) * z_range_nm + 50.0
        dense = render_dense_psf((64, 64), x, y, z, photons, optics, 100.0)
        sx, sy = astigmatic_sigmas_nm(z, optics)
        exact = render_gaussian_psfs((64, 64), x, y, photons, sx / 100.0, sy / 100.0)
        assert np.abs(dense - exact).max() < 0.02 * exact.max()
        assert dense.sum() == pytest.approx(exact.sum(), rel=1e-3)
    # one point: all its light, centred, with the astigmatic widths (within 3 %)
    yy, xx = np.mgrid[:64, :64] + 0.5
    for z_nm in (-400.0, 0.0, 300.0):
        image = render_dense_psf((64, 64), [32.3], [31.8], [z_nm], [1e4], optics, 100.0)
        total = image.sum()
        mx, my = (image * xx).sum() / total, (image * yy).sum() / total
        wx = np.sqrt((image * (xx - mx) ** 2).sum() / total - 1 / 12) * 100.0
        wy = np.sqrt((image * (yy - my) ** 2).sum() / total - 1 / 12) * 100.0
        sx, sy = astigmatic_sigmas_nm(z_nm, optics)
        assert total == pytest.approx(1e4, rel=1e-6)
        assert (mx, my) == pytest.approx((32.3, 31.8), abs=1e-6)
        assert (wx, wy) == pytest.approx((sx, sy), rel=0.03)


def test_live_snap_has_the_smlm_signature_and_an_empty_emitter_truth() -> None:
    scope = SimulatedMicroscope(_live(48), seed=1)
    scope.excitation_mw = 50.0
    frame, truth = scope.snap(20.0)
    assert frame.shape == (48, 48) and frame.dtype == np.uint16
    assert truth.mode == "live" and truth.frame == 0
    assert truth.id.size == truth.x_nm.size == truth.photons.size == 0
    assert truth.background_per_px == pytest.approx(10.0)  # 10 /mW/s/px x 50 mW x 20 ms
    assert isinstance(truth.events, list)
    table = truth_table(scope.truth_log)
    assert "id" in table and all(len(col) == 0 for col in table.values())
    # the tubules are bright over the background: 300 nm tubules peak at ~300 photons/px
    expected = scope.last_expected_photons
    assert 100.0 < expected.max() - truth.background_per_px < 1500.0
    assert np.median(expected) < 3 * truth.background_per_px  # most of the field is dark between tubules


def test_network_is_tubular_and_as_dense_as_configured() -> None:
    config = _live(128)
    net = SimulatedMicroscope(config, seed=3).network
    live = config.live
    field_um2 = (12.8 + 2 * 1.5) ** 2  # the field and the margin the network also fills
    assert net.length_um / field_um2 == pytest.approx(live.length_density_um_per_um2, rel=0.1)
    lo, hi = live.tubule_width_min_nm, live.tubule_width_max_nm
    assert np.all(net.width_nm >= 0.5 * lo) and np.all(net.width_nm <= 1.5 * hi)
    assert lo * 0.95 < np.median(net.width_nm) < hi * 1.05
    assert np.abs(net.base_nm[:, 2]).max() <= live.z_range_nm / 2 + 1e-9
    lengths_um = (net.seg_end_nm - net.seg_start_nm) / 1000.0
    assert lengths_um.max() <= live.tubule_length_max_um + 0.1
    assert np.sum(lengths_um < live.tubule_length_min_um) > 0  # side branches are shorter


def test_motion_speed_and_drift_are_as_configured() -> None:
    config = _live(64, motion_nm_per_s=20.0, motion_amplitude_nm=300.0, drift_x_nm_per_s=5.0)
    net = SimulatedMicroscope(config, seed=0).network
    sq_speeds = []
    for t in np.linspace(0.0, 200.0, 41):
        step = net.positions_nm(t + 0.5) - net.positions_nm(t - 0.5)
        step[:, 0] -= 5.0  # the drift's 1 s share
        sq_speeds.append(np.mean(np.sum(step[:, :2] ** 2, axis=1)))
    assert np.sqrt(np.mean(sq_speeds)) == pytest.approx(20.0, rel=0.15)
    still = SimulatedMicroscope(_live(64, motion_nm_per_s=0.0, drift_y_nm_per_s=-3.0), seed=0).network
    moved = still.positions_nm(10.0) - still.positions_nm(0.0)
    np.testing.assert_allclose(moved, np.tile([0.0, -30.0, 0.0], (len(moved), 1)), atol=1e-9)


def test_defocus_blurs_astigmatically() -> None:
    """Sharpest near focus; above focus x edges are sharper than y edges, below the reverse."""
    config = _live(96, fission_rate_per_um_per_s=0.0, motion_nm_per_s=0.0, z_range_nm=0.0)
    config.drift.focus_drift_nm_per_s = config.drift.focus_noise_nm = 0.0
    sharpness, anisotropy = {}, {}
    for z_um in (-0.6, -0.3, 0.0, 0.3, 0.6):
        scope = SimulatedMicroscope(config, seed=4)
        scope.excitation_mw, scope.stage_z_um = 50.0, z_um
        scope.snap(20.0)
        image = scope.last_expected_photons
        gx, gy = sobel(image, axis=1), sobel(image, axis=0)
        sharpness[z_um] = np.mean(gx**2 + gy**2)
        anisotropy[z_um] = np.mean(gx**2) / np.mean(gy**2)
    assert sharpness[0.0] > sharpness[0.3] > sharpness[0.6]
    assert sharpness[0.0] > sharpness[-0.3] > sharpness[-0.6]
    # z > 0: sigma_x < sigma_y, so intensity changes faster along x
    assert anisotropy[0.3] > 1.2 and anisotropy[0.6] > 1.2
    assert anisotropy[-0.3] < 1 / 1.2 and anisotropy[-0.6] < 1 / 1.2


# ---- bleaching -------------------------------------------------------------
def _signal_decay(excitation_mw: float, exposure_ms: float, frames: int, interval_ms: float = 0.0) -> np.ndarray:
    """Mean photons per pixel above background, frame by frame (a still network, no fission)."""
    config = _live(64, fission_rate_per_um_per_s=0.0, motion_nm_per_s=0.0)
    scope = SimulatedMicroscope(config, seed=6)
    scope.excitation_mw = excitation_mw
    signal = []
    for _ in range(frames):
        frame, truth = scope.snap(exposure_ms, interval_ms)
        signal.append(adu_to_photons(frame, config.camera).mean() - truth.background_per_px)
    return np.array(signal)


def test_live_brightness_decays_with_dose_and_faster_at_higher_excitation() -> None:
    k = LiveConfig().bleach_per_mj
    low = _signal_decay(20.0, 20.0, 150)  # 0.4 mJ per frame
    high = _signal_decay(80.0, 20.0, 150)  # 1.6 mJ per frame
    # brightness is proportional to the excitation power (before bleaching)
    assert high[0] / low[0] == pytest.approx(4.0 * np.exp(-k * 0.6), rel=0.03)
    # both decay; the brighter light bleaches faster, and the decay follows exp(-k dose)
    assert low[-1] < low[0] and high[-1] < high[0]
    assert high[-1] / high[0] < low[-1] / low[0]
    for signal, dose_per_frame in ((low, 0.4), (high, 1.6)):
        assert signal[-1] / signal[0] == pytest.approx(np.exp(-k * dose_per_frame * 149), rel=0.03)
    # it is the dose that bleaches: dark time between frames does not
    slow = _signal_decay(80.0, 20.0, 150, interval_ms=500.0)
    assert slow[-1] / slow[0] == pytest.approx(high[-1] / high[0], rel=0.03)


# ---- fission ---------------------------------------------------------------
def _peak_across(image: np.ndarray, x_nm: float, y_nm: float, direction_deg: float, background: float) -> float:
    """Highest intensity above background across the tubule within 150 nm of (x, y).

    (Short, so that a neighbouring tubule does not stand in for the neck.)
    """
    across = np.deg2rad(direction_deg + 90.0)
    d_px = np.linspace(-1.5, 1.5, 13)
    xs = x_nm / 100.0 + d_px * np.cos(across) - 0.5  # pixel centres at k + 0.5
    ys = y_nm / 100.0 + d_px * np.sin(across) - 0.5
    return float(map_coordinates(image, [ys, xs], order=1).max()) - background


def test_constriction_narrows_the_tubule_before_division(fission_run) -> None:
    """At the neck, the intensity across the tubule falls by > 30 % between onset and division.

    Scored on events seen through their whole constriction, away (> 400 nm) from
    other tubules: where tubules cross or branch, the neighbour's light fills the neck.
    """
    scope, shots = fission_run
    net = scope.network
    seen: dict[int, list] = {}
    for k, (_, _, truth) in enumerate(shots):
        for ev in truth.events:
            seen.setdefault(ev.id, []).append((k, ev))
    drops_expected, drops_noisy = [], []
    for event_id, rows in seen.items():
        constricting = [(k, ev) for k, ev in rows if ev.phase == "constricting"]
        dividing = [k for k, ev in rows if ev.phase == "dividing"]
        if len(constricting) < 8:  # not seen through its constriction inside the frame
            continue
        (k0, first), (k1, last) = constricting[0], constricting[-1]
        assert first.neck_width_nm > 2 * last.neck_width_nm  # wide at onset ...
        assert last.neck_width_nm < 1.3 * scope.config.live.neck_width_nm  # ... a neck before division
        assert not dividing or min(dividing) > k1
        event = net.events[event_id]
        pos = net.positions_nm(event.onset_s)
        distance = np.hypot(*(pos[:, :2] - pos[event.point, :2]).T)
        others = (net.chain != net.chain[event.point]) | (np.abs(net.s_nm - event.s_nm) > 1000.0)
        if distance[others].min() < 400.0:
            continue
        bg = shots[k0][2].background_per_px
        for images, drops in (
            ([shots[k0][1], shots[k1][1]], drops_expected),
            ([adu_to_photons(shots[k][0], scope.config.camera) for k in (k0, k1)], drops_noisy),
        ):
            before = _peak_across(images[0], first.x_nm, first.y_nm, first.direction_deg, bg)
            after = _peak_across(images[1], last.x_nm, last.y_nm, last.direction_deg, bg)
            drops.append(1.0 - after / before)
    assert len(drops_expected) >= 4
    assert min(drops_expected) > 0.3 and np.median(drops_expected) > 0.45
    assert np.median(drops_noisy) > 0.3  # visible in the noisy frames too


def test_fission_events_occur_at_the_configured_rate(fission_run) -> None:
    scope, shots = fission_run
    net = scope.network
    expected = scope.config.live.fission_rate_per_um_per_s * net.fissionable_um_s
    assert expected > 8
    assert abs(len(net.events) - expected) < 3.5 * np.sqrt(expected)
    # the process alone on a larger network, three seeds, onsets drawn on the time grid and per interval
    for fission_step_s in (0.1, None):
        counts, lam = 0, 0.0
        for seed in range(3):
            config = _live(256, fission_rate_per_um_per_s=0.05, constriction_s=1.0, division_s=0.5,
                           fission_step_s=fission_step_s)
            net = SimulatedMicroscope(config, seed=seed).network
            for t in np.arange(0.5, 40.01, 0.5):
                net.advance_to(float(t))
            counts += len(net.events)
            lam += 0.05 * net.fissionable_um_s
        assert lam > 550
        assert abs(counts - lam) < 3.5 * np.sqrt(lam)  # Poisson: within 3.5 sd (about 15 %)
        # onsets are uniform in time, not bunched at the 0.5 s steps
        onsets = np.array([ev.onset_s for ev in net.events])
        assert 0.4 < np.mean(np.mod(onsets, 0.5) / 0.5) < 0.6


def test_fission_events_do_not_depend_on_the_frame_times() -> None:
    """Two runs of one seed, one advanced every 0.5 s and one at irregular times (as a
    policy that changes the frame rate would): the same events, at the same places."""
    def events(times_s: np.ndarray) -> list[tuple[float, int]]:
        config = _live(96, fission_rate_per_um_per_s=0.05, constriction_s=1.0, division_s=0.5, fusion_s=3.0)
        net = SimulatedMicroscope(config, seed=4).network
        for t in times_s:
            net.advance_to(float(t))
        return [(ev.onset_s, ev.point) for ev in net.events]

    regular = events(np.arange(0.5, 40.01, 0.5))
    times_s = np.cumsum(np.random.default_rng(1).uniform(0.005, 0.7, 200))
    irregular = events(np.append(times_s[times_s < 40.0], 40.0))
    assert len(regular) > 30
    assert irregular == regular


def test_fusion_keeps_the_network_from_fragmenting() -> None:
    def fissionable_um(fusion_s: float | None, t_end_s: float) -> tuple[float, float, float]:
        config = _live(128, fission_rate_per_um_per_s=0.03, constriction_s=1.0, division_s=0.5, fusion_s=fusion_s)
        net = SimulatedMicroscope(config, seed=1).network
        start_um, start_length = net._fissionable().sum() * 0.1, net.length_um
        for t in np.arange(0.5, t_end_s + 0.01, 0.5):
            net.advance_to(float(t))
        return start_um, net._fissionable().sum() * 0.1, net.length_um / start_length

    start, with_fusion, length_ratio = fissionable_um(10.0, 120.0)
    _, without, _ = fissionable_um(None, 120.0)
    assert with_fusion > 0.6 * start  # a steady state
    assert without < 0.5 * start  # pieces too short to divide again
    assert length_ratio > 0.9  # closed gaps give their length back


def test_divisions_and_fusions_keep_the_network_consistent() -> None:
    """Fast fission and fusion for 100 s: every event and closing gap stays on its tubule."""
    config = _live(96, fission_rate_per_um_per_s=0.05, constriction_s=1.0, division_s=0.5, fusion_s=3.0)
    net = SimulatedMicroscope(config, seed=0).network
    start_length = net.length_um
    for t in np.arange(0.25, 100.01, 0.25):
        net.advance_to(float(t))
        assert all(net.segment[ev.point] == ev.segment for ev in net.active)
        assert all(net.segment[f.point] == f.segment for f in net._fusions if f.segment >= 0)
        inside = (net.s_nm >= net.seg_start_nm[net.segment]) & (net.s_nm <= net.seg_end_nm[net.segment])
        assert np.all(inside | (net._static_width_nm == 0))  # dye only inside a tubule's current extent
        open_gaps = sum(1 for f in net._fusions if f.segment < 0)
        assert net.length_um == pytest.approx(start_length - open_gaps * 2 * config.live.retraction_nm / 1000)
    assert len(net.events) > 100


def test_event_truth_phases_and_table(fission_run) -> None:
    _, shots = fission_run
    truths = [t for _, _, t in shots]
    table = events_table(truths)
    assert tuple(table) == EVENT_COLUMNS
    assert list(table)[:5] == ["frame", "id", "x [nm]", "y [nm]", "phase"]
    n = sum(len(t.events) for t in truths)
    assert n > 0 and all(len(col) == n for col in table.values())
    assert set(table["phase"]) == {"constricting", "dividing"}
    t_mid = table["t [s]"] + 0.005  # events are evaluated at mid-exposure (10 ms)
    constricting = table["phase"] == "constricting"
    assert np.all(table["onset [s]"] <= t_mid)
    assert np.all(t_mid[constricting] < table["division [s]"][constricting])
    assert np.all(t_mid[~constricting] >= table["division [s]"][~constricting])
    assert np.all(t_mid < table["end [s]"])
    np.testing.assert_allclose(table["division [s]"] - table["onset [s]"], 1.0)
    assert np.all((table["x [nm]"] >= 0) & (table["x [nm]"] < 6400))
    empty = events_table([])
    assert tuple(empty) == EVENT_COLUMNS and all(len(c) == 0 for c in empty.values())


def test_faster_imaging_shows_more_of_an_event() -> None:
    def frames_per_event(interval_ms: float, duration_s: float) -> float:
        config = _live(64, fission_rate_per_um_per_s=0.03, constriction_s=2.0, division_s=1.0)
        scope = SimulatedMicroscope(config, seed=9)
        scope.excitation_mw = 50.0
        counts: dict[int, int] = {}
        for _ in range(int(duration_s * 1000 / interval_ms)):
            _, truth = scope.snap(10.0, interval_ms)
            for ev in truth.events:
                counts[ev.id] = counts.get(ev.id, 0) + 1
        return float(np.median(list(counts.values())))

    fast, slow = frames_per_event(100.0, 30.0), frames_per_event(1000.0, 30.0)
    assert fast == pytest.approx(30.0, abs=6.0)  # 3 s of event at 10 frames/s
    assert slow == pytest.approx(3.0, abs=1.0)


# ---- determinism, config, export -------------------------------------------
def test_live_same_seed_identical_frames_other_seed_differs() -> None:
    def run(seed: int) -> tuple[np.ndarray, list]:
        config = _live(48, fission_rate_per_um_per_s=0.05, constriction_s=0.5, division_s=0.2)
        scope = SimulatedMicroscope(config, seed=seed)
        scope.excitation_mw = 50.0
        shots = [scope.snap(20.0, 200.0) for _ in range(40)]
        events = [(e.id, e.segment, e.s_nm, e.onset_s) for e in scope.network.events]
        seen = [(t.frame, e.id, e.x_nm, e.phase) for _, t in shots for e in t.events]
        return np.stack([f for f, _ in shots]), events, seen

    a, events_a, seen_a = run(5)
    b, events_b, seen_b = run(5)
    c, events_c, _ = run(6)
    np.testing.assert_array_equal(a, b)
    assert events_a == events_b and len(events_a) > 0
    assert seen_a == seen_b
    assert not np.array_equal(a, c) and events_a != events_c


@pytest.mark.parametrize(
    ("live", "field", "words"),
    [
        ({"tubule_width_min_nm": 500.0}, "tubule_width_min_nm", "must be <="),
        ({"tubule_length_min_um": 9.0}, "tubule_length_min_um", "must be <="),
        ({"neck_width_nm": 250.0}, "neck_width_nm", "must be <"),
        ({"fission_rate_per_um_per_s": -1.0}, "fission_rate_per_um_per_s", "greater than or equal to 0"),
        ({"constriction_s": 0.0}, "constriction_s", "greater than 0"),
        ({"width_variation": 0.7}, "width_variation", "less than 0.5"),
        ({"tubule_width": 300.0}, "tubule_width", "Extra inputs"),
    ],
)
def test_bad_live_config_is_refused_with_field_and_range(live: dict, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as err:
        SimulationConfig.model_validate({"mode": "live", "live": live})
    assert field in str(err.value) and words in str(err.value)
    with pytest.raises(ValidationError) as err:
        SimulationConfig.model_validate({"mode": "widefield"})
    assert "mode" in str(err.value) and "'smlm' or 'live'" in str(err.value)


def test_simulate_writes_events_csv_in_live_mode(tmp_path) -> None:
    config = load_config()
    config.simulation = _live(48, fission_rate_per_um_per_s=0.05, constriction_s=0.5, division_s=0.2)
    config.acquisition.exposure_ms, config.acquisition.interval_ms = 20.0, 200.0
    paths = simulate_to_dir(config, n_frames=30, out_dir=tmp_path, seed=1, progress=False)
    assert set(paths) == {"stack", "truth", "events"}
    assert paths["events"] == tmp_path / "events.csv" and paths["truth"] == tmp_path / "truth.csv"
    with open(paths["events"], newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == EVENT_COLUMNS
    assert len(rows) > 1 and {r[4] for r in rows[1:]} <= {"constricting", "dividing"}
    assert all(0 <= int(r[0]) < 30 for r in rows[1:])
    # SMLM mode writes no events file
    smlm = load_config()
    smlm.simulation.camera.width_px = smlm.simulation.camera.height_px = 32
    assert "events" not in simulate_to_dir(smlm, n_frames=2, out_dir=tmp_path / "smlm", progress=False)
