"""Physics of the simulated microscope: sample, dye photophysics, optics, camera.

Pure functions on arrays (optics, camera, sample) plus one stateful
`SimulatedMicroscope` that the simulated Micro-Manager devices drive, in two
modes: SMLM (blinking emitters) and live (a moving, dividing tubular network,
`live.py`).
"""

from __future__ import annotations

from smartscope.simulation.camera import adu_to_photons, photons_to_adu
from smartscope.simulation.config import (
    CameraConfig,
    DriftConfig,
    LiveConfig,
    OpticsConfig,
    PhotophysicsConfig,
    SampleConfig,
    SimulationConfig,
)
from smartscope.simulation.live import EventTruth, TubularNetwork
from smartscope.simulation.microscope import (
    EVENT_COLUMNS,
    FrameTruth,
    SimulatedMicroscope,
    events_table,
    truth_table,
)
from smartscope.simulation.optics import (
    astigmatic_sigmas_nm,
    integrated_gaussian_crlb_nm,
    render_dense_psf,
    render_gaussian_psfs,
)
from smartscope.simulation.sample import make_structure, rotate_positions

__all__ = [
    "EVENT_COLUMNS",
    "CameraConfig",
    "DriftConfig",
    "EventTruth",
    "FrameTruth",
    "LiveConfig",
    "OpticsConfig",
    "PhotophysicsConfig",
    "SampleConfig",
    "SimulatedMicroscope",
    "SimulationConfig",
    "TubularNetwork",
    "adu_to_photons",
    "astigmatic_sigmas_nm",
    "events_table",
    "integrated_gaussian_crlb_nm",
    "make_structure",
    "photons_to_adu",
    "render_dense_psf",
    "render_gaussian_psfs",
    "rotate_positions",
    "truth_table",
]
