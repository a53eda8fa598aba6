"""Pupil-function PSFs anchored to the card: they follow the card's widths, and render where the truth says."""

from __future__ import annotations

import numpy as np

from smartscope.simulation import CameraConfig, OpticsConfig, astigmatic_sigmas_nm
from smartscope.simulation.pupil import (
    ANCHOR,
    TABLE_HALF,
    TABLE_SAMPLE_NM,
    PupilFamily,
    anchor_error_nm,
    gaussian_widths_nm,
    psf_planes,
)
from smartscope.simulation.tiles import simulate_windows

OPTICS = OpticsConfig()


def _anchored_planes(z_nm: np.ndarray) -> np.ndarray:
    return psf_planes(z_nm, OPTICS.model_copy(update={"na": ANCHOR["na"]}), OPTICS.wavelength_nm,
                      {(2, 2): ANCHOR["astigmatism_rad"]}, ANCHOR["blur_nm"])


def test_the_anchor_follows_the_cards_astigmatic_widths():
    z = np.arange(-600.0, 601.0, 100.0)
    error = anchor_error_nm(OPTICS, ANCHOR["na"], ANCHOR["astigmatism_rad"], ANCHOR["blur_nm"], z)
    assert error <= ANCHOR["rms_width_error_nm"] + 0.5
    # the elongation's sign is the card's: sigma_x < sigma_y above focus
    (sx_above, sy_above), (sx_below, sy_below) = (gaussian_widths_nm(p) for p in _anchored_planes(np.array([300.0, -300.0])))
    card_x, card_y = astigmatic_sigmas_nm(np.array([300.0]), OPTICS)
    assert sx_above < sy_above and sx_below > sy_below
    assert abs(sx_above - card_x[0]) < 30 and abs(sy_above - card_y[0]) < 30


def test_a_rendered_emitter_sits_at_its_snapped_position_with_its_light():
    plane = _anchored_planes(np.array([0.0]))[0]
    family = PupilFamily(tables=plane[None, None], z_nm=np.array([0.0]))
    emitter = family.snap_nm(np.array([[1234.0, 987.0, 10.0, 5000.0]]))
    assert np.allclose(emitter[0, :3], [1237.5, 987.5, 0.0])  # sample centres 25 nm apart, the one plane
    image = np.zeros((32, 32))
    family.render(image, 0, emitter, 100.0)
    yy, xx = (np.mgrid[:32, :32] + 0.5) * 100.0
    centroid = np.array([(image * xx).sum(), (image * yy).sum()]) / image.sum()
    assert np.allclose(centroid, emitter[0, :2], atol=2.0)  # a symmetric PSF: its centroid is the emitter
    assert np.isclose(image.sum(), 5000 * plane.sum(), rtol=1e-5)  # all of the table's light, once
    assert 0.85 < plane.sum() < 0.98  # what falls within 17 pixels; the rest is lost, as on a camera
    assert TABLE_HALF * 2 * TABLE_SAMPLE_NM == 1700


def test_pupil_tiles_put_their_truth_on_the_table_grid():
    rng = np.random.default_rng(0)
    family = PupilFamily.draw(rng, 2)
    _, truth, _ = simulate_windows(rng, 6, 3, 40, OPTICS, CameraConfig(), pupil_family=family, pupil_share=1.0)
    xy = np.concatenate(truth)[:, :2]
    assert len(xy) > 0
    assert np.allclose((xy / TABLE_SAMPLE_NM) % 1.0, 0.5)
