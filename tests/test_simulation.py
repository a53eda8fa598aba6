"""The simulated microscope against the physics it claims: numbers, not mocks."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy.special import erf
from scipy.stats import chisquare, poisson

from smartscope.simulation import (
    CameraConfig,
    DriftConfig,
    OpticsConfig,
    SampleConfig,
    SimulatedMicroscope,
    SimulationConfig,
    adu_to_photons,
    astigmatic_sigmas_nm,
    integrated_gaussian_crlb_nm,
    make_structure,
    photons_to_adu,
    render_gaussian_psfs,
    rotate_positions,
    truth_table,
)
from smartscope.simulation.camera import poisson_counts


# ---- optics ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("photons", "background", "expected_nm"),
    [(500, 10, 9.1), (1000, 10, 5.6), (2000, 20, 4.0)],
)
def test_crlb_matches_published_values(photons: float, background: float, expected_nm: float) -> None:
    crlb = integrated_gaussian_crlb_nm(photons, background, 130.0, 100.0)
    assert crlb == pytest.approx(expected_nm, rel=0.03)
    emccd = integrated_gaussian_crlb_nm(photons, background, 130.0, 100.0, em_excess=2.0)
    assert emccd == pytest.approx(crlb * np.sqrt(2), rel=1e-9)


def test_crlb_vectorised_equals_scalar() -> None:
    photons = np.array([500.0, 1000.0, 2000.0])
    values = integrated_gaussian_crlb_nm(photons, 10.0, 130.0, 100.0)
    assert values.shape == (3,)
    for n, v in zip(photons, values, strict=True):
        assert v == pytest.approx(integrated_gaussian_crlb_nm(float(n), 10.0, 130.0, 100.0))


def _dense_reference(shape: tuple[int, int], x: float, y: float, n: float, sx: float, sy: float) -> np.ndarray:
    """Brute-force integrated Gaussian over every pixel of the frame."""
    ex = 0.5 * np.diff(erf((np.arange(shape[1] + 1) - x) / (np.sqrt(2) * sx)))
    ey = 0.5 * np.diff(erf((np.arange(shape[0] + 1) - y) / (np.sqrt(2) * sy)))
    return n * ey[:, None] * ex[None, :]


# small frame: every PSF takes the whole-frame separable path; large frame:
# the in-focus ones take the windowed path
@pytest.mark.parametrize("shape", [(40, 50), (300, 320)])
def test_render_matches_dense_integration_including_clipped_edges(shape: tuple[int, int]) -> None:
    h, w = shape
    # inside, on the left edge, in the far corner, partly below the frame, very
    # defocused, mid-defocus, and entirely outside the frame
    x = np.array([20.3, 0.2, w - 0.1, 25.0, 30.0, 12.0, w + 40.0])
    y = np.array([15.7, 20.0, h - 0.4, h + 1.5, 20.0, 25.0, 10.0])
    n = np.array([1000.0, 2000.0, 1500.0, 800.0, 5000.0, 3000.0, 1000.0])
    sx = np.array([1.3, 1.3, 2.0, 1.1, 9.0, 4.0, 1.3])
    sy = np.array([1.3, 1.8, 1.0, 1.5, 7.0, 3.0, 1.3])
    image = render_gaussian_psfs(shape, x, y, n, sx, sy)
    reference = sum(_dense_reference(shape, *args) for args in zip(x, y, n, sx, sy, strict=True))
    assert image.shape == shape and image.dtype == np.float64
    # windows end at ±4 sigma: the truncated tails are < 1e-5 of an emitter per pixel
    np.testing.assert_allclose(image, reference, atol=1e-5 * n.max())
    assert image.sum() == pytest.approx(reference.sum(), rel=1e-4)
    # an emitter centred on the corner pixel's outer corner keeps a quarter of its light
    corner = render_gaussian_psfs(shape, [0.0], [0.0], [1000.0], [1.3], [1.3])
    assert corner.sum() == pytest.approx(250.0, rel=1e-3)
    # out= accumulates onto a background
    onto = render_gaussian_psfs(shape, x, y, n, sx, sy, out=np.full(shape, 5.0))
    np.testing.assert_allclose(onto, image + 5.0)


@pytest.mark.parametrize("z_nm", [-500.0, -300.0, 0.0, 300.0, 500.0])
def test_psf_width_matches_astigmatic_model(z_nm: float) -> None:
    optics = OpticsConfig()
    pixel_nm = 100.0
    sx_nm, sy_nm = astigmatic_sigmas_nm(np.array([z_nm]), optics)
    image = render_gaussian_psfs((64, 64), [32.2], [31.7], [1e4], sx_nm / pixel_nm, sy_nm / pixel_nm)
    yy, xx = np.mgrid[:64, :64] + 0.5  # pixel centres
    total = image.sum()
    mx, my = (image * xx).sum() / total, (image * yy).sum() / total
    # second moment of a pixel-integrated Gaussian = sigma^2 + 1/12 px^2
    measured_x = np.sqrt((image * (xx - mx) ** 2).sum() / total - 1 / 12) * pixel_nm
    measured_y = np.sqrt((image * (yy - my) ** 2).sum() / total - 1 / 12) * pixel_nm
    assert (mx, my) == pytest.approx((32.2, 31.7), abs=1e-3)
    assert measured_x == pytest.approx(sx_nm[0], rel=0.05)
    assert measured_y == pytest.approx(sy_nm[0], rel=0.05)
    if z_nm == optics.astig_focal_offset_nm:
        assert measured_x == pytest.approx(optics.psf_sigma_nm, rel=0.05)
    if z_nm > 0:
        assert measured_x < measured_y
    elif z_nm < 0:
        assert measured_x > measured_y
    else:
        assert measured_x == pytest.approx(measured_y, rel=1e-6)


# ---- camera ---------------------------------------------------------------
@pytest.mark.parametrize(
    "camera",
    [CameraConfig(), CameraConfig(em_gain=100.0, e_per_adu=20.0, qe=0.95, read_noise_e=50.0)],
    ids=["scmos", "emccd"],
)
def test_detected_photons_of_isolated_emitters(camera: CameraConfig) -> None:
    rng = np.random.default_rng(7)
    shape, photons, background = (64, 64), 2000.0, 10.0
    centres = 8 + 12 * np.arange(5)
    gx, gy = np.meshgrid(centres, centres)
    sums = []
    for _ in range(20):
        x = gx.ravel() + rng.uniform(0, 1, gx.size)
        y = gy.ravel() + rng.uniform(0, 1, gy.size)
        expected = render_gaussian_psfs(shape, x, y, photons, 1.3, 1.3, out=np.full(shape, background))
        estimate = adu_to_photons(photons_to_adu(expected, camera, rng), camera)
        for cx, cy in zip(x.astype(int), y.astype(int), strict=True):
            box = estimate[cy - 5 : cy + 6, cx - 5 : cx + 6]
            sums.append(box.sum() - background * box.size)
    assert np.mean(sums) == pytest.approx(photons, rel=0.05)


@pytest.mark.parametrize("em_gain", [1.0, 50.0])
def test_camera_noise_is_shot_plus_read_noise(em_gain: float) -> None:
    camera = CameraConfig(em_gain=em_gain, e_per_adu=0.5 if em_gain == 1 else 10.0, read_noise_e=2.0)
    photons = 30.0
    frames = photons_to_adu(np.full((4, 256, 256), photons), camera, np.random.default_rng(1))
    assert frames.dtype == np.uint16
    estimate = adu_to_photons(frames, camera)
    excess = 2.0 if em_gain > 1 else 1.0
    var_e = excess * camera.qe * photons * em_gain**2 + camera.read_noise_e**2 + camera.e_per_adu**2 / 12
    expected_var = var_e / (camera.qe * em_gain) ** 2
    assert estimate.mean() == pytest.approx(photons, rel=0.01)
    assert estimate.var() == pytest.approx(expected_var, rel=0.05)


def test_fast_poisson_sampler_is_exact() -> None:
    """Background floor by table inversion plus sparse excess: still Poisson per pixel."""
    mean = np.full((400, 500), 16.0)
    mean[::2] += 3.3  # half the pixels carry extra signal
    counts = poisson_counts(mean, np.random.default_rng(3))
    for values, lam in [(counts[1::2].ravel(), 16.0), (counts[::2].ravel(), 19.3)]:
        k = np.arange(int(lam - 3 * np.sqrt(lam)), int(lam + 4 * np.sqrt(lam)))
        observed = np.array([(values == i).sum() for i in k])
        expected = poisson.pmf(k, lam) * values.size
        expected *= observed.sum() / expected.sum()
        assert chisquare(observed, expected).pvalue > 1e-3
        assert values.mean() == pytest.approx(lam, rel=0.01)
        assert values.var() == pytest.approx(lam, rel=0.03)


def test_adc_clips_to_bit_depth() -> None:
    camera = CameraConfig(bit_depth=12)
    frame = photons_to_adu(np.full((8, 8), 1e6), camera, np.random.default_rng(0))
    assert frame.max() == 2**12 - 1
    dark = photons_to_adu(np.zeros((64, 64)), camera, np.random.default_rng(0))
    assert abs(dark.mean() - camera.offset_adu) < 0.5


# ---- sample ---------------------------------------------------------------
def test_filaments_fill_field_within_z_range() -> None:
    sample = SampleConfig()
    field = (6400.0, 6400.0)
    pos = make_structure(sample, field, np.random.default_rng(0))
    assert pos.shape[1] == 3 and pos.dtype == np.float64
    assert pos[:, 0].min() >= 0 and pos[:, 0].max() < field[0]
    assert pos[:, 1].min() >= 0 and pos[:, 1].max() < field[1]
    jitter = 5 * sample.label_jitter_nm
    assert np.abs(pos[:, 2]).max() <= sample.z_range_nm / 2 + jitter
    # each filament crosses the field: at least the field width per filament
    assert len(pos) > 0.8 * sample.n_filaments * sample.labels_per_um * field[0] / 1000


def test_rotation_changes_the_projection() -> None:
    sample = SampleConfig(structure="ring", n_rings=1, ring_height_nm=0.0, label_jitter_nm=0.0)
    field = (6400.0, 6400.0)
    pos = make_structure(sample, field, np.random.default_rng(1))
    centre = (field[0] / 2, field[1] / 2)
    np.testing.assert_allclose(rotate_positions(pos, 0.0, "y", centre), pos)
    edge_on = rotate_positions(pos, 90.0, "y", centre)
    # a flat ring seen edge-on: no extent left in x, the diameter is now along z
    assert np.ptp(edge_on[:, 0]) < 1.0
    assert np.ptp(edge_on[:, 2]) == pytest.approx(sample.ring_diameter_nm, rel=0.02)
    np.testing.assert_allclose(edge_on[:, 1], pos[:, 1])
    tilted = rotate_positions(pos, 60.0, "x", centre)
    assert np.ptp(tilted[:, 1]) == pytest.approx(0.5 * np.ptp(pos[:, 1]), rel=0.02)
    np.testing.assert_allclose(tilted[:, 0], pos[:, 0])


# ---- the microscope -------------------------------------------------------
def _on_counts(activation_mw: float, frames: int = 100, excitation_mw: float = 50.0) -> tuple[float, float]:
    scope = SimulatedMicroscope(SimulationConfig(), seed=11)
    scope.activation_mw, scope.excitation_mw = activation_mw, excitation_mw
    counts, photons = [], []
    for _ in range(frames):
        _, truth = scope.snap(20.0)
        counts.append(truth.id.size)
        photons.extend(truth.photons)
    return float(np.mean(counts)), float(np.mean(photons)) if photons else 0.0


def test_on_emitters_rise_with_activation_and_demo_is_tuned() -> None:
    means = [_on_counts(a)[0] for a in (0.0, 50.0, 200.0)]
    assert means[0] < means[1] < means[2]
    assert means[0] < 4  # only a few blink spontaneously
    demo_on, demo_photons = _on_counts(100.0)
    assert 5 <= demo_on <= 30
    assert 1000 <= demo_photons <= 3000


def test_bleaching_grows_with_excitation_dose() -> None:
    fractions = []
    for excitation_mw, exposure_ms in [(10.0, 20.0), (50.0, 20.0), (50.0, 60.0)]:
        scope = SimulatedMicroscope(SimulationConfig(), seed=5)
        scope.activation_mw, scope.excitation_mw = 200.0, excitation_mw
        for _ in range(100):
            scope.snap(exposure_ms)
        fractions.append(scope.bleached_fraction)
    assert 0 < fractions[0] < fractions[1] < fractions[2]
    # no excitation photons, no bleaching, however much the molecules blink
    scope = SimulatedMicroscope(SimulationConfig(), seed=5)
    scope.activation_mw, scope.excitation_mw = 300.0, 0.0
    for _ in range(100):
        _, truth = scope.snap(20.0, interval_ms=100.0)
        assert truth.id.size == 0 and truth.background_per_px == 0.0
    assert scope.bleached_fraction == 0.0


def test_image_holds_the_truth_photons() -> None:
    """The light in the image is the truth's photons, through the camera model, within 5 %.

    Scored on the inner part of the frame (8 px from the edges): the truth lists
    every emitter centred in the frame, so the light each sends into the inner
    part is known exactly (erf over its PSF), and emitters off the frame are > 6
    sigma away from it.
    """
    config = SimulationConfig()
    scope = SimulatedMicroscope(config, seed=2)
    scope.activation_mw, scope.excitation_mw = 100.0, 50.0
    lo, hi = 8, 56  # inner pixels [8, 56)
    measured, true = 0.0, 0.0
    for _ in range(30):
        frame, truth = scope.snap(20.0)
        assert truth.background_per_px == pytest.approx(20.0)
        inner = adu_to_photons(frame, config.camera)[lo:hi, lo:hi]
        measured += inner.sum() - truth.background_per_px * inner.size
        x, y = truth.x_nm / 100.0, truth.y_nm / 100.0
        sx, sy = truth.sigma_x_nm / 100.0, truth.sigma_y_nm / 100.0
        fx = 0.5 * (erf((hi - x) / (np.sqrt(2) * sx)) - erf((lo - x) / (np.sqrt(2) * sx)))
        fy = 0.5 * (erf((hi - y) / (np.sqrt(2) * sy)) - erf((lo - y) / (np.sqrt(2) * sy)))
        true += np.sum(truth.photons * fx * fy)
    assert true > 1e4
    assert measured == pytest.approx(true, rel=0.05)


def test_focus_follows_stage_and_drift_rate() -> None:
    config = SimulationConfig(drift=DriftConfig(focus_drift_nm_per_s=2.0, focus_noise_nm=2.0))
    scope = SimulatedMicroscope(config, seed=3)
    times, offsets = [], []
    for _ in range(200):
        _, truth = scope.snap(20.0, interval_ms=5000.0)
        times.append(truth.t_s)
        offsets.append(truth.focus_offset_nm)
    rate = np.polyfit(times, offsets, 1)[0]
    assert rate == pytest.approx(2.0, rel=0.10)
    before = scope.focus_offset_nm
    scope.stage_z_um += 0.5
    assert scope.focus_offset_nm == pytest.approx(before + 500.0)


def test_truth_z_is_the_defocus_seen_in_the_psf() -> None:
    config = SimulationConfig(sample=SampleConfig(structure="uniform", z_range_nm=0.0))
    scope = SimulatedMicroscope(config, seed=4)
    scope.activation_mw, scope.excitation_mw = 300.0, 50.0
    scope.stage_z_um = 0.4
    _, truth = scope.snap(20.0)
    assert truth.id.size > 0
    np.testing.assert_allclose(truth.z_nm, truth.focus_offset_nm)
    assert truth.focus_offset_nm == pytest.approx(400.0, abs=5.0)
    assert np.all(truth.sigma_x_nm < truth.sigma_y_nm)  # z > 0: narrower in x


def test_same_seed_same_frames_other_seed_differs() -> None:
    def frames(seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
        scope = SimulatedMicroscope(SimulationConfig(), seed=seed)
        scope.activation_mw, scope.excitation_mw = 100.0, 50.0
        shots = [scope.snap(20.0) for _ in range(5)]
        return np.stack([f for f, _ in shots]), [t.id for _, t in shots]

    a, ids_a = frames(3)
    b, ids_b = frames(3)
    c, _ = frames(4)
    np.testing.assert_array_equal(a, b)
    for x, y in zip(ids_a, ids_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a, c)


def test_truth_table_columns_and_uncertainty() -> None:
    scope = SimulatedMicroscope(SimulationConfig(), seed=9)
    scope.activation_mw, scope.excitation_mw = 100.0, 50.0
    for _ in range(10):
        scope.snap(20.0)
    table = truth_table(scope.truth_log)
    assert list(table) == [
        "id", "frame", "x [nm]", "y [nm]", "z [nm]",
        "intensity [photon]", "offset [photon]", "uncertainty [nm]",
    ]  # fmt: skip
    n = sum(t.id.size for t in scope.truth_log)
    assert n > 0 and all(len(col) == n for col in table.values())
    assert table["frame"].min() >= 0 and table["frame"].max() <= 9
    assert scope.truth_log[0].frame == 0
    i = int(np.argmax(table["intensity [photon]"]))
    t = scope.truth_log[int(table["frame"][i])]
    j = int(np.flatnonzero(t.id == table["id"][i])[0])
    qe = scope.config.camera.qe
    expected = integrated_gaussian_crlb_nm(
        t.photons[j] * qe, t.background_per_px * qe, t.sigma_x_nm[j], 100.0, sigma_y_nm=t.sigma_y_nm[j]
    )
    assert table["uncertainty [nm]"][i] == pytest.approx(expected, rel=1e-9)
    assert np.all(np.isfinite(table["uncertainty [nm]"]))
    empty = truth_table([])
    assert list(empty) == list(table) and all(len(col) == 0 for col in empty.values())


# ---- configuration --------------------------------------------------------
def test_bad_config_is_refused_with_the_field_named() -> None:
    with pytest.raises(ValidationError) as err:
        OpticsConfig(na=1.6, immersion_index=1.518)
    assert "na" in str(err.value) and "immersion_index" in str(err.value)
    with pytest.raises(ValidationError) as err:
        SimulationConfig.model_validate({"camera": {"pixel_size_nm": 0}})
    assert "pixel_size_nm" in str(err.value) and "greater than 0" in str(err.value)
    with pytest.raises(ValidationError) as err:  # the message names the field and the allowed range
        SimulationConfig.model_validate({"camera": {"qe": 1.2}})
    assert "camera.qe" in str(err.value) and "less than or equal to 1" in str(err.value)
    with pytest.raises(ValidationError) as err:
        SimulationConfig.model_validate({"photophysics": {"k_off_per_s": -3}})
    assert "photophysics.k_off_per_s" in str(err.value) and "greater than 0" in str(err.value)
    with pytest.raises(ValidationError) as err:
        SimulationConfig.model_validate({"camera": {"width_px": 5000}})
    assert "camera.width_px" in str(err.value) and "less than or equal to 4096" in str(err.value)
    with pytest.raises(ValidationError) as err:
        SimulationConfig.model_validate({"camera": {"pixel_size": 100}})
    assert "pixel_size" in str(err.value)


# ---- the validations, through the camera ----------------------------
@pytest.mark.parametrize("z_nm", [-300.0, 300.0])
def test_psf_width_in_noisy_frames_matches_sigma(z_nm: float) -> None:
    """Isolated emitters through the whole camera chain: second moments give sigma within 5 %."""
    optics, camera = OpticsConfig(), CameraConfig()
    rng = np.random.default_rng(12)
    sx_nm, sy_nm = astigmatic_sigmas_nm(z_nm, optics)
    shape, background, photons = (128, 128), 20.0, 5000.0
    centres = 14 + 25 * np.arange(5)
    gx, gy = np.meshgrid(centres, centres)
    half = 10
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    moments = []
    for _ in range(20):
        x = gx.ravel() + rng.uniform(0, 1, gx.size)
        y = gy.ravel() + rng.uniform(0, 1, gy.size)
        expected = render_gaussian_psfs(shape, x, y, photons, sx_nm / 100, sy_nm / 100, out=np.full(shape, background))
        estimate = adu_to_photons(photons_to_adu(expected, camera, rng), camera) - background
        for cx, cy, fx, fy in zip(x.astype(int), y.astype(int), x % 1, y % 1, strict=True):
            box = estimate[cy - half : cy + half + 1, cx - half : cx + half + 1]
            dx, dy = xx + 0.5 - fx, yy + 0.5 - fy  # offsets of pixel centres from the true position
            moments.append(((box * dx**2).sum(), (box * dy**2).sum(), box.sum()))
    mx, my, total = np.sum(moments, axis=0)
    measured_x = np.sqrt(mx / total - 1 / 12) * 100
    measured_y = np.sqrt(my / total - 1 / 12) * 100
    assert measured_x == pytest.approx(sx_nm, rel=0.05)
    assert measured_y == pytest.approx(sy_nm, rel=0.05)
    if z_nm == optics.astig_focal_offset_nm:  # sigma_x in its own focus: the configured width
        assert measured_x == pytest.approx(optics.psf_sigma_nm, rel=0.05)
    assert (measured_x < measured_y) == (z_nm > 0)  # the sign of the defocus is visible


def test_scmos_whole_chain_table_draws_the_step_by_step_distribution() -> None:
    """Background pixels come from one table of the whole photon -> ADU chain: same distribution."""
    from scipy.stats import chi2_contingency

    from smartscope.simulation.camera import _electrons_to_adu

    rng = np.random.default_rng(4)
    for camera in (
        CameraConfig(),
        CameraConfig(read_noise_e=0.0),
        CameraConfig(e_per_adu=2.3, read_noise_e=3.1, offset_adu=5.0),  # clips at 0
        CameraConfig(bit_depth=8, offset_adu=200.0),  # clips at 255
    ):
        for photons in (0.0, 3.0, 20.0, 150.0):
            table = photons_to_adu(np.full((300, 400), photons), camera, rng).ravel()
            electrons = rng.poisson(photons * camera.qe, table.size).astype(np.float32)
            direct = _electrons_to_adu(electrons, camera, rng).ravel()
            values = np.union1d(table, direct)
            counts = np.array([[np.sum(a == v) for v in values] for a in (table, direct)])
            counts = counts[:, counts.sum(axis=0) >= 20]
            if counts.shape[1] > 1:
                assert chi2_contingency(counts)[1] > 1e-4
            assert table.mean() == pytest.approx(direct.mean(), abs=0.05 + 0.002 * direct.mean())
    # frames with signal: only the background floor is drawn from the table
    frame = np.full((64, 64), 20.0)
    frame[20:30, 20:30] += 500.0
    adu = adu_to_photons(photons_to_adu(np.broadcast_to(frame, (50, 64, 64)).copy(), CameraConfig(), rng), CameraConfig())
    assert adu[:, 20:30, 20:30].mean() == pytest.approx(520.0, rel=0.01)
    assert adu[:, 40:, 40:].mean() == pytest.approx(20.0, rel=0.01)


def test_rotation_changes_what_the_smlm_image_shows() -> None:
    """Filaments tilted by 45 degrees spread over microns in z: fewer emitters in focus, wider PSFs."""
    config = SimulationConfig(sample=SampleConfig(structure="filaments", z_range_nm=200.0))
    config.drift.focus_drift_nm_per_s = config.drift.focus_noise_nm = 0.0

    def seen(angle_deg: float) -> tuple[np.ndarray, np.ndarray, float]:
        scope = SimulatedMicroscope(config, seed=13)
        scope.activation_mw, scope.excitation_mw, scope.angle_deg = 300.0, 50.0, angle_deg
        truths = [scope.snap(20.0)[1] for _ in range(40)]
        z = np.concatenate([t.z_nm for t in truths])
        width = np.concatenate([np.sqrt(t.sigma_x_nm * t.sigma_y_nm) for t in truths])
        return z, width, float(np.mean([t.id.size for t in truths]))

    z0, width0, n0 = seen(0.0)
    z45, width45, n45 = seen(45.0)
    assert np.std(z45) > 5 * np.std(z0)  # the 6.4 um field tilted: +-2 um of depth
    in_focus = (np.mean(np.abs(z0) < 300), np.mean(np.abs(z45) < 300))
    assert in_focus[0] > 0.95 and in_focus[1] < 0.4
    assert np.median(width45) > 1.5 * np.median(width0)
    assert n45 > 0.5 * n0  # the structure is still in view, seen differently


def test_a_superseded_camera_sequence_ends_instead_of_running_on():
    """UniMMCore forgets a sequence thread it could not join in 2 s and re-arms the stop event at the
    next start: the simulated camera's older sequence must end by itself once a newer one starts."""
    from smartscope.hardware.simulated import SimCamera

    scope = SimulatedMicroscope(SimulationConfig(), seed=1)
    cam = SimCamera(scope, realtime=True)
    cam.set_exposure(10.0)
    cam.set_interval_ms(200.0)

    def buffer(shape, dtype):
        return np.empty(shape, dtype)

    old = cam.start_sequence(None, buffer)
    next(old)  # the first frame; the next one is due in 200 ms
    new = cam.start_sequence(3, buffer)
    assert len(list(new)) == 3
    with pytest.raises(StopIteration):
        next(old)
