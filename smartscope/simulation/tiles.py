"""Independent random tiles of emitters: the training and test data of the localizer.

Unlike `SimulatedMicroscope` (a sample that evolves in time), each tile here is
drawn fresh from a wide distribution of density, brightness, z and background,
so a network sees every condition the microscope can produce. The optics and
the camera are the simulator's own functions.
"""

from __future__ import annotations

import numpy as np

from smartscope.simulation.camera import adu_to_photons, photons_to_adu
from smartscope.simulation.config import CameraConfig, OpticsConfig
from smartscope.simulation.optics import astigmatic_sigmas_nm, render_gaussian_psfs
from smartscope.simulation.pupil import PupilFamily

TILE_DISTRIBUTION = {
    "emitters_per_um2": (0.0, 1.5),
    "photons": (300.0, 8000.0),  # log-uniform
    "z_nm": (-600.0, 600.0),
    "background_photons_per_px": (2.0, 200.0),  # log-uniform
}
#: per frame: the simulated microscope's k_off = 30/s gives exp(-30 x 0.02) = 0.55 at 20 ms frames
P_STAY_ON = 0.5


def random_emitters(rng: np.random.Generator, tile_px: int, pixel_size_nm: float) -> np.ndarray:
    """(K, 4) x_nm, y_nm, z_nm, photons, drawn from TILE_DISTRIBUTION (some just off the edge)."""
    d = TILE_DISTRIBUTION
    area_um2 = (tile_px * pixel_size_nm / 1000) ** 2
    k = rng.poisson(rng.uniform(*d["emitters_per_um2"]) * area_um2)
    xy = rng.uniform(-1.0, tile_px + 1.0, size=(k, 2)) * pixel_size_nm
    photons = np.exp(rng.uniform(*np.log(d["photons"]), size=k))
    return np.column_stack([xy, rng.uniform(*d["z_nm"], size=k), photons])


def dense_emitters(rng: np.random.Generator, n: int, tile_px: int, pixel_size_nm: float, density_per_um2: float,
                   z_half_range_nm: float) -> list[np.ndarray]:
    """n tiles of emitters (K, 4: x_nm, y_nm, z_nm, photons) at a fixed mean density, z uniform in
    ±z_half_range_nm and 500-5000 photons (log-uniform): the test sets of the localizer."""
    area_um2 = (tile_px * pixel_size_nm / 1000) ** 2
    em = []
    for _ in range(n):
        k = rng.poisson(density_per_um2 * area_um2)
        em.append(np.column_stack([rng.uniform(0, tile_px * pixel_size_nm, (k, 2)),
                                   rng.uniform(-z_half_range_nm, z_half_range_nm, k),
                                   np.exp(rng.uniform(np.log(500), np.log(5000), k))]))
    return em


def simulate_tiles(rng: np.random.Generator, n: int, tile_px: int, optics: OpticsConfig, camera: CameraConfig,
                   *, emitters: list[np.ndarray] | None = None, background: np.ndarray | None = None,
                   as_adu: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """n noisy tiles (n, H, W), in photons (float32) or raw ADU (uint16), and the
    emitters inside each tile (K, 4): x_nm, y_nm, z_nm, photons."""
    frames, truth, _ = simulate_windows(rng, n, 1, tile_px, optics, camera, emitters=emitters,
                                        background=background, as_adu=as_adu)
    return frames[:, 0], truth


def simulate_windows(rng: np.random.Generator, n: int, frames: int, tile_px: int, optics: OpticsConfig,
                     camera: CameraConfig, *, emitters: list[np.ndarray] | None = None,
                     background: np.ndarray | None = None, as_adu: bool = False,
                     structured_background: bool = False, pupil_family: PupilFamily | None = None,
                     pupil_share: float = 0.0,
                     ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """n causal windows of `frames` frames (n, T, H, W), the emitters inside the LAST
    frame (K, 4: x_nm, y_nm, z_nm, photons) and its background (n, H, W) photons/px.

    The emitters of the last frame (drawn, or given) blink back in time: a
    molecule on in frame t was on in t-1 with probability P_STAY_ON (a two-state
    chain at steady state is reversible), with a partial on-time there; and
    others, off by frame t, were on before (as many as turned off: like the frame's
    emitters, elsewhere).
    With `structured_background`, half the tiles get a smooth out-of-focus glow
    (a broad Gaussian up to 3x the flat level) that the network must not take
    for emitters and learns to estimate. With a `pupil_family`, `pupil_share` of
    the tiles draw their emitters through one of its members (a real PSF's rings
    and side lobes; the emitters snapped to its grid, so the truth is where the
    light is), the rest through the card's Gaussian. frames=1 draws exactly the
    old tiles.
    """
    px = camera.pixel_size_nm
    out = np.empty((n, frames, tile_px, tile_px), np.uint16 if as_adu else np.float32)
    backgrounds = np.empty((n, tile_px, tile_px), np.float32)
    truth = []
    yy, xx = np.mgrid[0:tile_px, 0:tile_px] + 0.5
    for i in range(n):
        em = random_emitters(rng, tile_px, px) if emitters is None else emitters[i]
        bg = (np.exp(rng.uniform(*np.log(TILE_DISTRIBUTION["background_photons_per_px"])))
              if background is None else background[i])
        bg_map = np.full((tile_px, tile_px), bg, np.float64)
        member = None
        if pupil_family is not None and rng.random() < pupil_share:
            member = int(rng.integers(pupil_family.members))
            em = pupil_family.snap_nm(em)
        if structured_background and rng.random() < 0.5:
            cx, cy = rng.uniform(0, tile_px, 2)
            width_px = rng.uniform(4.0, 16.0)
            bg_map *= 1 + rng.uniform(0.0, 3.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * width_px**2))
        # back in time: the last frame's emitters, and those that went off since
        lit = [em]
        for _ in range(frames - 1):
            stayed = lit[-1][rng.random(len(lit[-1])) < P_STAY_ON]
            stayed = stayed * [1, 1, 1, 0] + [0, 0, 0, 1] * stayed[:, 3:] * rng.uniform(0.3, 1.0, (len(stayed), 1))
            # as many went off as stayed off: like the frame's emitters, elsewhere
            gone = em[rng.integers(0, len(em), rng.poisson(len(em) * (1 - P_STAY_ON)))] if len(em) else em
            gone = np.column_stack([rng.uniform(-1.0, tile_px + 1.0, (len(gone), 2)) * px, gone[:, 2:]])
            lit.append(np.concatenate([stayed, gone if member is None else pupil_family.snap_nm(gone)]))
        for t, e in enumerate(reversed(lit)):
            if member is None:
                sx, sy = astigmatic_sigmas_nm(e[:, 2], optics)
                img = render_gaussian_psfs((tile_px, tile_px), e[:, 0] / px, e[:, 1] / px, e[:, 3], sx / px, sy / px,
                                           out=bg_map.copy())
            else:
                img = bg_map.copy()
                pupil_family.render(img, member, e, px)
            adu = photons_to_adu(img, camera, rng)
            out[i, t] = adu if as_adu else adu_to_photons(adu, camera)
        backgrounds[i] = bg_map
        inside = (em[:, 0] >= 0) & (em[:, 0] < tile_px * px) & (em[:, 1] >= 0) & (em[:, 1] < tile_px * px)
        truth.append(em[inside])
    return out, truth, backgrounds
