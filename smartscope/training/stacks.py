"""Short blinking stacks with per-pixel emitter counts: data of the counting model.

Numpy only (no torch), so tests and benchmarks draw exactly the data the
model was trained and scored on. Each stack is T frames of one field of
emitters that blink (a two-state Markov chain per frame, with partial
on-times); the target is the number of emitters on in the LAST frame per
pixel, clipped to the classes 0, 1, 2, 3+ (HD-SMLM). The window is causal so
the count of a frame is known as soon as it arrives.
"""

from __future__ import annotations

import numpy as np

from smartscope.inference.counting import N_CLASSES
from smartscope.simulation import CameraConfig, OpticsConfig
from smartscope.simulation.camera import adu_to_photons, photons_to_adu
from smartscope.simulation.config import SampleConfig
from smartscope.simulation.optics import astigmatic_sigmas_nm, render_gaussian_psfs
from smartscope.simulation.sample import filament_length_nm, make_structure

STACK_DISTRIBUTION = {
    "on_density_per_um2": (0.5, 8.0),  # emitters on per frame, uniform
    # a quarter of the stacks sparse instead (log-uniform): the 99th percentile the input is clipped
    # to moves onto the emitters there, and a counter that never saw it overcounted (1.45x at 0.1 /µm²)
    "sparse_fraction": 0.25,
    "sparse_density_per_um2": (0.02, 0.5),
    "photons": (500.0, 5000.0),  # per full on-frame, log-uniform
    "z_nm": (-500.0, 500.0),
    "background_photons_per_px": (5.0, 100.0),  # log-uniform
    "p_stay_on": 0.5,  # per frame
    "on_fraction": 0.2,  # of the pool, per frame
}


def simulate_stacks(rng: np.random.Generator, n: int, frames: int, tile_px: int, optics: OpticsConfig,
                    camera: CameraConfig, *, on_density_per_um2: float | None = None,
                    filaments: bool = False, offsets_out: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(n, T, H, W) photons, (n, H, W) int count targets of the last frame, and per stack
    the emitters on in the last frame (K, 3) x_nm, y_nm, snr.

    snr is the emitter's peak signal over its noise, N_peak / sqrt(N_peak + b), with
    N_peak = photons / (2 pi sigma_x sigma_y) (pixel units) and b the background per
    pixel: the published HD-SMLM counter was scored on emitters with snr >= 2 only.

    `filaments`: the pool along 1-4 filaments of the simulated sample instead of uniform,
    crowded along lines as labelled structures are (test stacks only: training on a
    third of them was tried, see models/README.md).

    `offsets_out`, an (n, 3, H, W) array, receives the offset targets of the last
    frame (see `nearest_emitter_offsets`).
    """
    d = STACK_DISTRIBUTION
    px = camera.pixel_size_nm
    area_um2 = (tile_px * px / 1000) ** 2
    stacks = np.empty((n, frames, tile_px, tile_px), np.float32)
    counts = np.zeros((n, tile_px, tile_px), np.int64)
    last_on = []
    p_stay = d["p_stay_on"]
    for i in range(n):
        density = on_density_per_um2
        if density is None:
            density = (np.exp(rng.uniform(*np.log(d["sparse_density_per_um2"])))
                       if rng.random() < d["sparse_fraction"] else rng.uniform(*d["on_density_per_um2"]))
        # a pool of which a fraction p_on is on per frame at steady state
        p_on = d["on_fraction"]
        pool = rng.poisson(density * area_um2 / p_on)
        if filaments:
            xy, z = _filament_pool(rng, pool, tile_px, px)
        else:
            xy = rng.uniform(-1.0, tile_px + 1.0, size=(pool, 2)) * px
            z = rng.uniform(*d["z_nm"], size=pool)
        pool = len(z)
        brightness = np.exp(rng.uniform(*np.log(d["photons"]), size=pool))
        sx, sy = astigmatic_sigmas_nm(z, optics)
        bg = np.exp(rng.uniform(*np.log(d["background_photons_per_px"])))
        p_turn_on = p_on * (1 - p_stay) / (1 - p_on)  # keeps the on-fraction at p_on
        on = rng.random(pool) < p_on
        for t in range(frames):
            if t:
                on = np.where(on, rng.random(pool) < p_stay, rng.random(pool) < p_turn_on)
            lit = np.flatnonzero(on)
            photons = brightness[lit] * rng.uniform(0.3, 1.0, size=lit.size)  # partial on-time
            img = render_gaussian_psfs((tile_px, tile_px), xy[lit, 0] / px, xy[lit, 1] / px, photons,
                                       sx[lit] / px, sy[lit] / px, out=np.full((tile_px, tile_px), bg))
            stacks[i, t] = adu_to_photons(photons_to_adu(img, camera, rng), camera)
        if offsets_out is not None:
            offsets_out[i] = nearest_emitter_offsets(xy[lit] / px, tile_px)
        ix, iy = (xy[lit, 0] // px).astype(int), (xy[lit, 1] // px).astype(int)
        inside = (ix >= 0) & (ix < tile_px) & (iy >= 0) & (iy < tile_px)
        np.add.at(counts[i], (iy[inside], ix[inside]), 1)
        peak = photons / (2 * np.pi * sx[lit] * sy[lit] / px**2)
        last_on.append(np.column_stack([xy[lit], peak / np.sqrt(peak + bg)])[inside])
    return stacks, np.minimum(counts, N_CLASSES - 1), last_on


FILAMENTS_PER_TILE = (1, 4)


def _filament_pool(rng: np.random.Generator, pool: int, tile_px: int, px_nm: float,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`pool` emitters (fewer if the filaments hold fewer) along worm-like filaments of the
    simulated sample, over the tile and its 1-pixel margin: (pool, 2) x, y nm and (pool,) z nm."""
    d = STACK_DISTRIBUTION
    side_nm = (tile_px + 2) * px_nm
    n_filaments = int(rng.integers(FILAMENTS_PER_TILE[0], FILAMENTS_PER_TILE[1] + 1))
    length_um = n_filaments * filament_length_nm(side_nm, side_nm) / 1000
    sample = SampleConfig(structure="filaments", n_filaments=n_filaments, z_range_nm=np.ptp(d["z_nm"]),
                          labels_per_um=max(3 * pool / length_um, 1e-3))  # about half the chain is inside
    xyz = make_structure(sample, (side_nm, side_nm), rng)
    xyz = xyz[rng.permutation(len(xyz))[:pool]]
    return xyz[:, :2] - px_nm, np.clip(xyz[:, 2], *d["z_nm"])


def nearest_emitter_offsets(xy_px: np.ndarray, tile_px: int, reach_px: int = 1) -> np.ndarray:
    """(3, H, W): dx, dy from each pixel's centre to the nearest emitter (px), and a mask
    of the pixels that have an emitter within `reach_px` pixels (their own or a neighbour's).

    The counting model learns these offsets beside the counts (as DECODE learns
    sub-pixel offsets), and not only on occupied pixels: a pixel next to an
    emitter learns to point at it, so the decoder can tell the two pixels lit
    by one emitter near a border (both point at one place) from two emitters
    in neighbouring pixels (each points at its own).
    """
    out = np.zeros((3, tile_px, tile_px), np.float32)
    best = np.full((tile_px, tile_px), np.inf)
    steps = np.arange(-reach_px, reach_px + 1)
    for ex, ey in xy_px:
        cx, cy = int(np.floor(ex)), int(np.floor(ey))
        for oy in steps:
            for ox in steps:
                x, y = cx + ox, cy + oy
                if 0 <= x < tile_px and 0 <= y < tile_px:
                    dx, dy = ex - (x + 0.5), ey - (y + 0.5)
                    d2 = dx * dx + dy * dy
                    if d2 < best[y, x]:
                        best[y, x] = d2
                        out[:, y, x] = dx, dy, 1.0
    return out
