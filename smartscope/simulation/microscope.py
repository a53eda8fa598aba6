"""The stateful simulated microscope the simulated camera device drives.

Each `snap` advances the sample by one frame period: the dye molecules blink
and bleach in continuous time under the lasers, the focus drifts, the
structure is seen at the current rotation angle and defocus through the
astigmatic PSF, and the camera adds its noise. The exact ground truth of every
frame comes back with it, so tests and training know what the image shows.

Assumptions worth knowing: both lasers are triggered by the camera (they
illuminate only during the exposure; in the dark rest of a long frame interval
molecules only relax and switch on spontaneously, and nothing bleaches); the
sample starts in the steady state for the lasers set at the first snap, as
after the usual pumping phase of a dSTORM experiment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from smartscope.simulation.camera import photons_to_adu
from smartscope.simulation.config import SimulationConfig
from smartscope.simulation.optics import (
    astigmatic_sigmas_nm,
    integrated_gaussian_crlb_nm,
    render_gaussian_psfs,
)
from smartscope.simulation.sample import make_structure, rotate_positions

_OFF, _ON, _BLEACHED = 0, 1, 2


def _empty() -> np.ndarray:
    return np.empty(0)


@dataclass
class FrameTruth:
    """What one frame really shows: the emitters that were on, and the conditions.

    Coordinates are in the image frame (after rotation), x_nm = x_px *
    pixel_size_nm with pixel k spanning [k, k+1), so a pixel centre is at
    (k + 0.5) * pixel_size_nm. Only emitters whose centre lies inside the frame
    and that gave light are listed (edge emitters still light the frame).
    """

    frame: int  # 0-based frame index
    t_s: float  # simulation time at the start of the exposure
    id: np.ndarray  # int64 molecule ids, stable across frames
    x_nm: np.ndarray
    y_nm: np.ndarray
    z_nm: np.ndarray  # defocus relative to the current focal plane; z > 0: sigma_x < sigma_y
    # Expected photons from the emitter that reach the camera this frame (photon
    # rate x on-time within the exposure), before QE: what a localizer that
    # converts ADU with adu_to_photons should report as intensity.
    photons: np.ndarray
    background_per_px: float  # expected background photons per pixel (before QE)
    focus_offset_nm: float  # (stage_z - focal plane incl. drift): defocus of sample z=0
    exposure_ms: float = 0.0
    sigma_x_nm: np.ndarray = field(default_factory=_empty)  # PSF widths, for the CRLB
    sigma_y_nm: np.ndarray = field(default_factory=_empty)
    pixel_size_nm: float = 100.0
    qe: float = 1.0
    em_excess: float = 1.0  # variance multiplier of the camera (2 for an EMCCD)
    activation_mw: float = 0.0
    excitation_mw: float = 0.0
    stage_z_um: float = 0.0
    angle_deg: float = 0.0


class SimulatedMicroscope:
    """A dSTORM microscope in software: set the actuator attributes, then snap.

    The actuator state is plain attributes (activation_mw, excitation_mw,
    stage_z_um, angle_deg) that the device adapters set between frames.
    """

    def __init__(
        self, config: SimulationConfig | None = None, seed: int = 0, *, keep_truth: bool = True
    ) -> None:
        self.config = config if config is not None else SimulationConfig()
        cam = self.config.camera
        # Separate streams: the sample depends on the seed alone, and camera noise
        # does not change the blinking.
        sample_seq, dye_seq, drift_seq, camera_seq = np.random.SeedSequence(seed).spawn(4)
        self._dye_rng = np.random.default_rng(dye_seq)
        self._drift_rng = np.random.default_rng(drift_seq)
        self._camera_rng = np.random.default_rng(camera_seq)
        self.field_nm = (cam.width_px * cam.pixel_size_nm, cam.height_px * cam.pixel_size_nm)
        self.positions_nm = make_structure(
            self.config.sample, self.field_nm, np.random.default_rng(sample_seq)
        )
        self._state = np.full(len(self.positions_nm), _OFF, dtype=np.int8)
        self._started = False
        self._drift_nm = 0.0  # sample displacement along z relative to the focal plane

        self.activation_mw = 0.0
        self.excitation_mw = 0.0
        self.stage_z_um = 0.0
        self.angle_deg = 0.0
        self.t_s = 0.0
        self.frame_index = 0
        self.keep_truth = keep_truth
        self.truth_log: list[FrameTruth] = []

    # ---- read-only views -------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """Frame shape (H, W) in pixels."""
        return (self.config.camera.height_px, self.config.camera.width_px)

    @property
    def n_molecules(self) -> int:
        return int(self._state.size)

    @property
    def bleached_fraction(self) -> float:
        """Fraction of all molecules bleached so far (the dye budget spent)."""
        return float(np.mean(self._state == _BLEACHED)) if self._state.size else 0.0

    @property
    def focus_offset_nm(self) -> float:
        """Current defocus of the sample's z=0 plane (nm): stage minus drifted focal plane."""
        return (self.stage_z_um - self.config.focal_plane_um) * 1000.0 + self._drift_nm

    # ---- the frame -------------------------------------------------------
    def snap(
        self, exposure_ms: float, interval_ms: float | None = None
    ) -> tuple[np.ndarray, FrameTruth]:
        """Advance one frame period, max(exposure, interval), and image its exposure.

        Returns the (H, W) uint16 ADU frame and its ground truth.
        """
        if not exposure_ms > 0:
            raise ValueError(f"exposure_ms must be > 0, got {exposure_ms}")
        if interval_ms is not None and interval_ms < 0:
            raise ValueError(f"interval_ms must be >= 0, got {interval_ms}")
        cfg = self.config
        pp, cam = cfg.photophysics, cfg.camera
        exposure_s = exposure_ms / 1000.0
        period_s = max(exposure_s, (interval_ms or 0.0) / 1000.0)
        activation_mw = max(0.0, float(self.activation_mw))
        excitation_mw = max(0.0, float(self.excitation_mw))
        k_on = pp.k_on_base_per_s + pp.k_on_per_mw_per_s * activation_mw
        photon_rate = pp.photons_per_mw_per_s * excitation_mw
        k_bleach = photon_rate * pp.bleach_per_photon

        if not self._started:
            p_on = k_on / (k_on + pp.k_off_per_s)
            self._state[self._dye_rng.random(self._state.size) < p_on] = _ON
            self._started = True

        focus_offset_nm = self._advance_drift(0.5 * exposure_s)  # mid-exposure
        on_time_s = self._expose(exposure_s, k_on, pp.k_off_per_s, k_bleach)
        self._relax(period_s - exposure_s, pp.k_on_base_per_s, pp.k_off_per_s)
        self._advance_drift(period_s - 0.5 * exposure_s)

        lit = np.flatnonzero(on_time_s > 0) if photon_rate > 0 else np.empty(0, np.int64)
        photons = photon_rate * on_time_s[lit]
        pos = rotate_positions(
            self.positions_nm[lit],
            self.angle_deg,
            cfg.rotation_axis,
            (0.5 * self.field_nm[0], 0.5 * self.field_nm[1]),
        )
        z_nm = pos[:, 2] + focus_offset_nm
        sigma_x_nm, sigma_y_nm = astigmatic_sigmas_nm(z_nm, cfg.optics)
        background = pp.background_photons_per_mw_per_s_per_px * excitation_mw * exposure_s

        expected = self.render(pos[:, 0], pos[:, 1], photons, sigma_x_nm, sigma_y_nm, background)
        frame = photons_to_adu(expected, cam, self._camera_rng)

        inside = (
            (pos[:, 0] >= 0)
            & (pos[:, 0] < self.field_nm[0])
            & (pos[:, 1] >= 0)
            & (pos[:, 1] < self.field_nm[1])
        )
        truth = FrameTruth(
            frame=self.frame_index,
            t_s=self.t_s,
            id=lit[inside].astype(np.int64),
            x_nm=pos[inside, 0],
            y_nm=pos[inside, 1],
            z_nm=z_nm[inside],
            photons=photons[inside],
            background_per_px=float(background),
            focus_offset_nm=float(focus_offset_nm),
            exposure_ms=float(exposure_ms),
            sigma_x_nm=sigma_x_nm[inside],
            sigma_y_nm=sigma_y_nm[inside],
            pixel_size_nm=cam.pixel_size_nm,
            qe=cam.qe,
            em_excess=2.0 if cam.em_gain > 1 else 1.0,
            activation_mw=activation_mw,
            excitation_mw=excitation_mw,
            stage_z_um=float(self.stage_z_um),
            angle_deg=float(self.angle_deg),
        )
        if self.keep_truth:
            self.truth_log.append(truth)
        self.t_s += period_s
        self.frame_index += 1
        return frame, truth

    def render(
        self,
        x_nm: np.ndarray,
        y_nm: np.ndarray,
        photons: np.ndarray,
        sigma_x_nm: np.ndarray,
        sigma_y_nm: np.ndarray,
        background_per_px: float = 0.0,
    ) -> np.ndarray:
        """Expected photons per pixel (H, W) float64 for emitters given in nm."""
        px = self.config.camera.pixel_size_nm
        image = np.full(self.shape, float(background_per_px))
        return render_gaussian_psfs(
            self.shape, x_nm / px, y_nm / px, photons, sigma_x_nm / px, sigma_y_nm / px, out=image
        )

    # ---- physics steps ---------------------------------------------------
    def _advance_drift(self, dt_s: float) -> float:
        """Move the drift on by dt_s (rate + random walk); return the new focus offset (nm)."""
        if dt_s > 0:
            drift = self.config.drift
            self._drift_nm += drift.focus_drift_nm_per_s * dt_s
            if drift.focus_noise_nm > 0:
                self._drift_nm += drift.focus_noise_nm * np.sqrt(dt_s) * self._drift_rng.normal()
        return self.focus_offset_nm

    def _expose(
        self, exposure_s: float, k_on: float, k_off: float, k_bleach: float
    ) -> np.ndarray:
        """Telegraph each molecule through the exposure; return its on-time (s), all N.

        Continuous time: exponential waiting times, looping only over the
        (few) molecules that still switch inside the window. Leaving the on
        state is off (k_off) or bleached (k_bleach = photon rate x bleach per photon).
        """
        state, rng = self._state, self._dye_rng
        on_time = np.zeros(state.size)
        idx = np.flatnonzero(state != _BLEACHED)
        t = np.zeros(idx.size)
        k_leave = k_off + k_bleach
        p_bleach = k_bleach / k_leave
        while idx.size:
            is_on = state[idx] == _ON
            rate = np.where(is_on, k_leave, k_on)
            with np.errstate(divide="ignore"):
                t_next = t + rng.standard_exponential(idx.size) / rate
            if is_on.any():
                on_time[idx[is_on]] += np.minimum(t_next[is_on], exposure_s) - t[is_on]
            switched = t_next < exposure_s
            idx, t, is_on = idx[switched], t_next[switched], is_on[switched]
            if not idx.size:
                break
            bleached = rng.random(idx.size) < p_bleach
            state[idx] = np.where(is_on, np.where(bleached, _BLEACHED, _OFF), _ON)
            keep = state[idx] != _BLEACHED
            idx, t = idx[keep], t[keep]
        return on_time

    def _relax(self, dark_s: float, k_on: float, k_off: float) -> None:
        """Dark part of the frame period: exact two-state relaxation, no bleaching."""
        if dark_s <= 0:
            return
        idx = np.flatnonzero(self._state != _BLEACHED)
        k_sum = k_on + k_off
        p_inf = k_on / k_sum
        decay = np.exp(-k_sum * dark_s)
        p_on = p_inf + ((self._state[idx] == _ON) - p_inf) * decay
        self._state[idx] = np.where(self._dye_rng.random(idx.size) < p_on, _ON, _OFF)


def truth_table(truths: list[FrameTruth]) -> dict[str, np.ndarray]:
    """Ground truth as ThunderSTORM-style columns (frame is the 0-based frame index).

    "offset [photon]" is the background per pixel; "uncertainty [nm]" is the
    lateral (x) CRLB of each emitter for its photons, background, astigmatic
    width and the camera's QE and excess noise (read noise neglected).
    """
    counts = [t.id.size for t in truths]

    def cat(values: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(values).astype(dtype) if values else np.empty(0, dtype)

    def per_row(attr: str) -> np.ndarray:
        """A per-frame scalar repeated for each of the frame's emitters."""
        return np.repeat([getattr(t, attr) for t in truths], counts)

    photons = cat([t.photons for t in truths], np.float64)
    if photons.size:
        qe, pixel_nm = per_row("qe"), per_row("pixel_size_nm")
        crlb_px = integrated_gaussian_crlb_nm(
            photons * qe,
            per_row("background_per_px") * qe,
            cat([t.sigma_x_nm for t in truths], np.float64) / pixel_nm,
            1.0,
            sigma_y_nm=cat([t.sigma_y_nm for t in truths], np.float64) / pixel_nm,
        )
        uncertainty = crlb_px * pixel_nm * np.sqrt(per_row("em_excess"))
        offset = per_row("background_per_px").astype(np.float64)
        frame = per_row("frame").astype(np.int64)
    else:
        uncertainty = offset = np.empty(0)
        frame = np.empty(0, np.int64)
    return {
        "id": cat([t.id for t in truths], np.int64),
        "frame": frame,
        "x [nm]": cat([t.x_nm for t in truths], np.float64),
        "y [nm]": cat([t.y_nm for t in truths], np.float64),
        "z [nm]": cat([t.z_nm for t in truths], np.float64),
        "intensity [photon]": photons,
        "offset [photon]": offset,
        "uncertainty [nm]": uncertainty,
    }
