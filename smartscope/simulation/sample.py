"""Labelled 3D structures and their rotation by the view-angle stage.

Positions are (N, 3) float64 arrays of x_nm, y_nm, z_nm in the sample frame:
x, y in [0, field) with the frame's pixel convention (x_nm = x_px *
pixel_size_nm), z centred on 0 (the sample's mid-plane).
"""

from __future__ import annotations

import numpy as np

from smartscope.simulation.config import SampleConfig

_PERSISTENCE_LENGTH_NM = 10_000.0  # bent microtubule-like filaments in a cell
_FILAMENT_STEP_NM = 10.0


def make_structure(
    sample: SampleConfig, field_nm: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """Molecule positions (N, 3) float64 [x_nm, y_nm, z_nm] in a (width_nm, height_nm) field."""
    width_nm, height_nm = float(field_nm[0]), float(field_nm[1])
    if sample.structure == "filaments":
        positions = _filaments(sample, width_nm, height_nm, rng)
    elif sample.structure == "ring":
        positions = _rings(sample, width_nm, height_nm, rng)
    else:
        area_um2 = width_nm * height_nm / 1e6
        n = rng.poisson(sample.density_per_um2 * area_um2)
        positions = np.column_stack(
            [
                rng.uniform(0, width_nm, n),
                rng.uniform(0, height_nm, n),
                rng.uniform(-0.5, 0.5, n) * sample.z_range_nm,
            ]
        )
        return positions
    if sample.label_jitter_nm > 0:
        positions = positions + rng.normal(0.0, sample.label_jitter_nm, positions.shape)
    inside = (
        (positions[:, 0] >= 0)
        & (positions[:, 0] < width_nm)
        & (positions[:, 1] >= 0)
        & (positions[:, 1] < height_nm)
    )
    return np.ascontiguousarray(positions[inside])


def filament_length_nm(width_nm: float, height_nm: float) -> float:
    """Each filament's chain length: 1.2 x the field's diagonal, long enough to cross it."""
    return float(np.hypot(width_nm, height_nm)) * 1.2


def _filaments(
    sample: SampleConfig, width_nm: float, height_nm: float, rng: np.random.Generator
) -> np.ndarray:
    """Worm-like chains through the central part of the field, long enough to cross it."""
    length_nm = filament_length_nm(width_nm, height_nm)
    n_steps = int(np.ceil(length_nm / _FILAMENT_STEP_NM))
    arc_nm = np.arange(n_steps + 1) * _FILAMENT_STEP_NM
    half_z = 0.5 * sample.z_range_nm
    shortest = min(width_nm, height_nm)
    parts = []
    for _ in range(sample.n_filaments):
        # Tangent angle: a random walk with variance ds / persistence length.
        kicks = rng.normal(0.0, np.sqrt(_FILAMENT_STEP_NM / _PERSISTENCE_LENGTH_NM), n_steps)
        angle = rng.uniform(0, np.pi) + np.concatenate([[0.0], np.cumsum(kicks)])
        x = np.concatenate([[0.0], np.cumsum(np.cos(angle[:-1]))]) * _FILAMENT_STEP_NM
        y = np.concatenate([[0.0], np.cumsum(np.sin(angle[:-1]))]) * _FILAMENT_STEP_NM
        # Put the chain's midpoint somewhere in the central 60 % of the field.
        mid = n_steps // 2
        x += rng.uniform(0.2, 0.8) * width_nm - x[mid]
        y += rng.uniform(0.2, 0.8) * height_nm - y[mid]
        # Smooth axial profile within ±z_range/2: two sine modes, weights summing to 1.
        weights = rng.dirichlet([1.0, 1.0])
        wavelengths = rng.uniform(1.0, 3.0, 2) * shortest
        phases = rng.uniform(0, 2 * np.pi, 2)
        modes = np.sin(2 * np.pi * arc_nm[None, :] / wavelengths[:, None] + phases[:, None])
        z = half_z * (weights @ modes)
        n = rng.poisson(sample.labels_per_um * length_nm / 1000.0)
        s = rng.uniform(0, arc_nm[-1], n)
        parts.append(np.column_stack([np.interp(s, arc_nm, v) for v in (x, y, z)]))
    return np.concatenate(parts) if parts else np.empty((0, 3))


def _rings(
    sample: SampleConfig, width_nm: float, height_nm: float, rng: np.random.Generator
) -> np.ndarray:
    """Hollow cylinders with their axis along z, placed without overlap where they fit."""
    radius = 0.5 * sample.ring_diameter_nm
    lo_x, hi_x = min(radius, width_nm / 2), max(width_nm - radius, width_nm / 2)
    lo_y, hi_y = min(radius, height_nm / 2), max(height_nm - radius, height_nm / 2)
    centres: list[np.ndarray] = []
    for _ in range(sample.n_rings):
        for _attempt in range(200):
            c = np.array([rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)])
            if all(np.hypot(*(c - o)) > 2.2 * radius for o in centres):
                break
        centres.append(c)  # overlap allowed if the field is too small for all rings
    parts = []
    for c in centres:
        if sample.ring_height_nm > 0:
            wall_um2 = np.pi * sample.ring_diameter_nm * sample.ring_height_nm / 1e6
            n = rng.poisson(sample.density_per_um2 * wall_um2)
        else:
            n = rng.poisson(sample.labels_per_um * np.pi * sample.ring_diameter_nm / 1000.0)
        phi = rng.uniform(0, 2 * np.pi, n)
        z = rng.uniform(-0.5, 0.5, n) * sample.ring_height_nm
        parts.append(
            np.column_stack([c[0] + radius * np.cos(phi), c[1] + radius * np.sin(phi), z])
        )
    return np.concatenate(parts)


def rotate_positions(
    positions_nm: np.ndarray, angle_deg: float, axis: str, centre_nm: tuple[float, float]
) -> np.ndarray:
    """Rotate (N, 3) positions about an in-plane axis through (centre_nm, z=0).

    The view-angle stage tilts the sample, so its projection on the camera
    changes with the angle (a ring seen edge-on becomes a line). axis "y"
    turns x into z; axis "x" turns y into z. Positive angles are
    counter-clockwise looking down the axis.
    """
    pos = np.asarray(positions_nm, dtype=np.float64)
    if angle_deg == 0:
        return pos.copy()
    a = np.deg2rad(angle_deg)
    cos_a, sin_a = np.cos(a), np.sin(a)
    out = pos.copy()
    if axis == "y":
        u = pos[:, 0] - centre_nm[0]
        out[:, 0] = centre_nm[0] + cos_a * u + sin_a * pos[:, 2]
        out[:, 2] = -sin_a * u + cos_a * pos[:, 2]
    elif axis == "x":
        v = pos[:, 1] - centre_nm[1]
        out[:, 1] = centre_nm[1] + cos_a * v - sin_a * pos[:, 2]
        out[:, 2] = sin_a * v + cos_a * pos[:, 2]
    else:
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    return out
