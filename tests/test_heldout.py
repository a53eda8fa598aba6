"""The held-out worlds produce what they say: parameters outside the training ranges,
an Airy PSF of the stated width, the stated bleaching, unbiased photon estimates,
edge-touching fields with no event, and a pupil PSF whose CRLB scales as it must."""

from __future__ import annotations

import numpy as np
import pytest

from smartscope.simulation import CameraConfig
from smartscope.simulation.heldout import (
    WORLD,
    HeldOutWorld,
    airy_psf,
    draw_params,
    edge_touching_field,
    independent_episode,
)
from smartscope.simulation.heldout_smlm import PupilPSF, render_frames
from smartscope.training.episodes import RANDOMISATION


def test_held_out_parameters_lie_outside_the_training_ranges_on_four_axes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = draw_params(rng)
        assert p.interval_s * 1000 > RANDOMISATION["interval_ms"][1]
        assert p.constriction_s > RANDOMISATION["constriction_s"][1]
        assert p.length_density_um_per_um2 > RANDOMISATION["length_density_um_per_um2"][1]
        assert p.bleach_lost > RANDOMISATION["bleach_over_episode"][1]
        assert WORLD["pixel_size_nm"][0] <= p.pixel_size_nm <= WORLD["pixel_size_nm"][1]


def test_airy_psf_has_the_stated_width():
    """FWHM 0.514 wavelength / NA, measured on a finely sampled kernel."""
    pixel_nm, wavelength_nm, na = 5.0, 520.0, 1.4
    psf = airy_psf(pixel_nm, wavelength_nm, na)
    c = psf.shape[0] // 2
    row = psf[c] / psf[c, c]
    above = np.flatnonzero(row >= 0.5)
    # half maximum crossing, interpolated on each side
    right = above[-1] + (row[above[-1]] - 0.5) / (row[above[-1]] - row[above[-1] + 1])
    fwhm_nm = 2 * (right - c) * pixel_nm
    assert fwhm_nm == pytest.approx(0.514 * wavelength_nm / na, rel=0.02)
    assert psf.sum() == pytest.approx(1.0)


def test_bleaching_and_photon_estimates_are_as_stated():
    rng = np.random.default_rng(1)
    for emccd in (False, True):
        p = draw_params(rng)
        p.emccd = emccd
        n_frames = 40
        world = HeldOutWorld(p, rng, n_frames=n_frames)
        first, _ = world.expected_photons()
        world.frame_index = n_frames  # same geometry, the run's whole dose later
        last, _ = world.expected_photons()
        floor = p.background_photons * world.illumination
        assert (last - floor).sum() / (first - floor).sum() == pytest.approx(1 - p.bleach_lost, rel=1e-6)
        world.frame_index = 0
        for _ in range(3):  # the pipeline's estimate is unbiased, within the camera's fixed pattern
            expected = world.expected_photons()[0].mean()
            assert world.frame()[0].mean() == pytest.approx(expected, rel=0.02)


def test_episode_events_lie_in_the_field_and_last_as_long_as_drawn():
    frames, events, interval_ms, params = independent_episode(np.random.default_rng(2), 30)
    assert frames.shape == (30, WORLD["field_px"], WORLD["field_px"]) and frames.dtype == np.float32
    assert 1000 * WORLD["interval_s"][0] <= interval_ms <= 1000 * WORLD["interval_s"][1]
    active = np.concatenate([e for e in events if len(e)])
    assert len(active) >= 10
    assert (active[:, 1:] >= 0).all() and (active[:, 1:] < WORLD["field_px"]).all()
    # an event is active for (constriction + division) / interval frames, unless cut by the run or the field
    spans = np.bincount(active[:, 0].astype(int))
    expected = (params.constriction_s + params.division_s) / params.interval_s
    assert spans.max() <= np.ceil(expected) + 1


def test_edge_touching_field_has_no_event_and_tubules_across_every_edge():
    world = HeldOutWorld(draw_params(np.random.default_rng(3), events=False), np.random.default_rng(4),
                         n_frames=4, edge_tubules=True)
    f = world.field_um
    crossing = {"left": False, "right": False, "top": False, "bottom": False}
    for tb in world.tubules:
        pts, _, _ = world._points(tb, 0.0)
        x, y = pts[:, 0], pts[:, 1]
        within_y, within_x = (y > 0) & (y < f), (x > 0) & (x < f)
        crossing["left"] |= bool(((x < 0) & within_y).any() and ((x > 0) & within_y).any())
        crossing["right"] |= bool(((x > f) & within_y).any() and ((x < f) & within_y).any())
        crossing["top"] |= bool(((y < 0) & within_x).any() and ((y > 0) & within_x).any())
        crossing["bottom"] |= bool(((y > f) & within_x).any() and ((y < f) & within_x).any())
    assert all(crossing.values()), crossing
    frames, pixel_nm, interval_ms = edge_touching_field(5, n_frames=3)
    assert frames.shape == (3, 128, 128) and 50 <= pixel_nm <= 120 and interval_ms > 10_000


def test_pupil_psf_is_centred_and_its_crlb_scales_as_one_over_root_photons():
    psf = PupilPSF()
    image = psf.image(0.0, 0.0, 0.0)
    yy, xx = np.mgrid[: psf.window_px, : psf.window_px] - psf.window_px // 2
    assert abs((image * xx).sum() / image.sum()) < 1e-3 and abs((image * yy).sum() / image.sum()) < 1e-3
    assert 0.8 < image.sum() < 1.0  # rings and aberrations put some light outside the 15 px window
    # the astigmatism shows the sign of z: wider in x on one side of focus, in y on the other
    for z, wider in ((-400.0, "x"), (400.0, "y")):
        im = psf.image(0.0, 0.0, z)
        var_x, var_y = (im * xx**2).sum() / im.sum(), (im * yy**2).sum() / im.sum()
        assert (var_x > 1.3 * var_y) if wider == "x" else (var_y > 1.3 * var_x)
    assert psf.crlb_x_nm(4000.0, 0.0) / psf.crlb_x_nm(1000.0, 0.0) == pytest.approx(0.5, rel=1e-3)
    assert psf.crlb_x_nm(1000.0, 50.0) > 1.2 * psf.crlb_x_nm(1000.0, 0.0)


def test_the_vectorial_psf_is_a_free_dipoles_wider_image():
    """The vectorial option (OTHER_PUPILS of `bench localization`): centred, its sign of z as the scalar one's,
    and wider, as a high-NA free dipole's image is (measured at focus: rms width +4-5 %, peak 0.74x)."""
    scalar, vectorial = PupilPSF(), PupilPSF(vectorial=True)
    yy, xx = np.mgrid[: scalar.window_px, : scalar.window_px] - scalar.window_px // 2
    s, v = scalar.image(0.0, 0.0, 0.0), vectorial.image(0.0, 0.0, 0.0)
    assert abs((v * xx).sum() / v.sum()) < 1e-3 and abs((v * yy).sum() / v.sum()) < 1e-3
    for axis in (xx, yy):
        ratio = np.sqrt((v * axis**2).sum() / v.sum() / ((s * axis**2).sum() / s.sum()))
        assert 1.02 < ratio < 1.08
    assert 0.65 < v.max() / s.max() < 0.85
    im = vectorial.image(0.0, 0.0, 400.0)
    assert (im * yy**2).sum() > 1.3 * (im * xx**2).sum()


def test_rendered_emitters_carry_their_photons():
    psf = PupilPSF()
    camera = CameraConfig(read_noise_e=0.0)
    em = [np.array([[1600.0, 1600.0, 0.0, 5000.0]])] * 20
    frames = render_frames(psf, em, 32, 0.0, camera, np.random.default_rng(6))
    photons = (frames.astype(float) - camera.offset_adu) * camera.e_per_adu / camera.qe
    window = psf.image(0.0, 0.0, 0.0).sum()
    assert photons.sum(axis=(1, 2)).mean() == pytest.approx(5000 * window, rel=0.02)
