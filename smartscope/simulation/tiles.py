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

TILE_DISTRIBUTION = {
    "emitters_per_um2": (0.0, 1.5),
    "photons": (300.0, 8000.0),  # log-uniform
    "z_nm": (-600.0, 600.0),
    "background_photons_per_px": (2.0, 200.0),  # log-uniform
}


def random_emitters(rng: np.random.Generator, tile_px: int, pixel_size_nm: float) -> np.ndarray:
    """(K, 4) x_nm, y_nm, z_nm, photons, drawn from TILE_DISTRIBUTION (some just off the edge)."""
    d = TILE_DISTRIBUTION
    area_um2 = (tile_px * pixel_size_nm / 1000) ** 2
    k = rng.poisson(rng.uniform(*d["emitters_per_um2"]) * area_um2)
    xy = rng.uniform(-1.0, tile_px + 1.0, size=(k, 2)) * pixel_size_nm
    photons = np.exp(rng.uniform(*np.log(d["photons"]), size=k))
    return np.column_stack([xy, rng.uniform(*d["z_nm"], size=k), photons])


def simulate_tiles(rng: np.random.Generator, n: int, tile_px: int, optics: OpticsConfig, camera: CameraConfig,
                   *, emitters: list[np.ndarray] | None = None, background: np.ndarray | None = None,
                   as_adu: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """n noisy tiles (n, H, W), in photons (float32) or raw ADU (uint16), and the
    emitters inside each tile (K, 4): x_nm, y_nm, z_nm, photons."""
    px = camera.pixel_size_nm
    frames = np.empty((n, tile_px, tile_px), np.uint16 if as_adu else np.float32)
    truth = []
    for i in range(n):
        em = random_emitters(rng, tile_px, px) if emitters is None else emitters[i]
        bg = (np.exp(rng.uniform(*np.log(TILE_DISTRIBUTION["background_photons_per_px"])))
              if background is None else background[i])
        sx, sy = astigmatic_sigmas_nm(em[:, 2], optics)
        img = render_gaussian_psfs((tile_px, tile_px), em[:, 0] / px, em[:, 1] / px, em[:, 3], sx / px, sy / px,
                                   out=np.full((tile_px, tile_px), bg, np.float64))
        adu = photons_to_adu(img, camera, rng)
        frames[i] = adu if as_adu else adu_to_photons(adu, camera)
        inside = (em[:, 0] >= 0) & (em[:, 0] < tile_px * px) & (em[:, 1] >= 0) & (em[:, 1] < tile_px * px)
        truth.append(em[inside])
    return frames, truth
