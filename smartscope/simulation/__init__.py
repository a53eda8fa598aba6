"""Physics of the simulated microscope: sample, dye photophysics, optics, camera.

Pure functions on arrays (optics, camera, sample) plus one stateful
`SimulatedMicroscope` that the simulated Micro-Manager devices drive.
"""

from __future__ import annotations

from smartscope.simulation.camera import adu_to_photons, photons_to_adu
from smartscope.simulation.config import (
    CameraConfig,
    DriftConfig,
    OpticsConfig,
    PhotophysicsConfig,
    SampleConfig,
    SimulationConfig,
)
from smartscope.simulation.microscope import FrameTruth, SimulatedMicroscope, truth_table
from smartscope.simulation.optics import (
    astigmatic_sigmas_nm,
    integrated_gaussian_crlb_nm,
    render_gaussian_psfs,
)
from smartscope.simulation.sample import make_structure, rotate_positions

__all__ = [
    "CameraConfig",
    "DriftConfig",
    "FrameTruth",
    "OpticsConfig",
    "PhotophysicsConfig",
    "SampleConfig",
    "SimulatedMicroscope",
    "SimulationConfig",
    "adu_to_photons",
    "astigmatic_sigmas_nm",
    "integrated_gaussian_crlb_nm",
    "make_structure",
    "photons_to_adu",
    "render_gaussian_psfs",
    "rotate_positions",
    "truth_table",
]
