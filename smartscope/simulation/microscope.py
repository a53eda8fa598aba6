"""The stateful simulated microscope the simulated camera device drives.

Each `snap` advances the sample by one frame period and images its exposure.
In SMLM mode the dye molecules blink and bleach in continuous time under the
lasers; in live mode a densely labelled tubular network moves, bleaches with
the excitation dose and divides (fission events, `live.py`). In both, the
focus drifts, the sample is seen at the current rotation angle and defocus
through the astigmatic PSF, and the camera adds its noise. The exact ground
truth of every frame comes back with it, so tests and training know what the
image shows.

Assumptions worth knowing: both lasers are triggered by the camera (they
illuminate only during the exposure; in the dark rest of a long frame interval
molecules only relax and switch on spontaneously, and nothing bleaches); the
SMLM sample starts in the steady state for the lasers set at the first snap, as
after the usual pumping phase of a dSTORM experiment. In live mode the
activation laser does nothing (the label does not photoswitch) and the
background does not bleach.

The SMLM sample may cover a slide of several fields (``slide_fields``) that an
XY stage moves under the objective. The lasers light only the field plus a
small margin, so only molecules there blink and bleach; the others stay in the
dark, where they relax exactly as in the dark part of a frame. That relaxation
is a two-state Markov chain with constant rates, so it is applied lazily, in
one exact step over the whole dark time, when a molecule comes back under the
lasers: the cost of a frame does not grow with the slide. The channel
(``channel``, set by the filter turret) picks the imaging: "smlm", the
blinking single molecules; or "widefield", a dim diffraction-limited ensemble
image in which every unbleached molecule under the lasers emits at once
(``widefield_photons_per_mw_per_s`` per mW of excitation, 2 % of an
on-emitter's rate) and none switches or bleaches: the dye only relaxes as in
the dark. Live mode images one field, the same in either channel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from smartscope.simulation.camera import photons_to_adu
from smartscope.simulation.config import SimulationConfig
from smartscope.simulation.live import STEP_NM, EventTruth, TubularNetwork
from smartscope.simulation.optics import (
    astigmatic_sigmas_nm,
    integrated_gaussian_crlb_nm,
    render_dense_psf,
    render_gaussian_psfs,
)
from smartscope.simulation.sample import make_structure, rotate_positions

_OFF, _ON, _BLEACHED = 0, 1, 2
# The lasers light the field plus this many in-focus PSF widths on each side, so
# molecules just outside the field still spill their light into its edge.
_MARGIN_SIGMAS = 4.0
# Stage positions this close outside the slide's range (um) are taken as on it:
# field multiples computed in floating point land a hair off.
_STAGE_TOLERANCE_UM = 1e-6


def _empty() -> np.ndarray:
    return np.empty(0)


@dataclass
class FrameTruth:
    """What one frame really shows: the emitters that were on, and the conditions.

    Coordinates are in the image frame (after rotation), x_nm = x_px *
    pixel_size_nm with pixel k spanning [k, k+1), so a pixel centre is at
    (k + 0.5) * pixel_size_nm; the frame's origin lies at (stage_x_um,
    stage_y_um) on the slide. Only emitters whose centre lies inside the frame
    and that gave light are listed (edge emitters still light the frame). In
    the widefield channel no emitter is listed (the ensemble does not blink:
    every unbleached molecule gives light, ``n_emitting`` of them inside the
    frame). In live mode the emitter arrays are empty and ``events`` lists the
    fission events active at mid-exposure whose neck lies inside the frame.
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
    mode: str = "smlm"
    events: list[EventTruth] = field(default_factory=list)
    # Fraction of the label's fluorescence not yet bleached, after this frame
    # (SMLM: molecules of the whole slide not bleached; live: exp(-bleach_per_mj * dose)).
    fluorescence_remaining: float = 1.0
    stage_x_um: float = 0.0  # the field's origin on the slide
    stage_y_um: float = 0.0
    channel: str = "smlm"  # "smlm" (blinking single molecules) or "widefield" (ensemble)
    n_emitting: int = 0  # molecules inside the frame that gave light (SMLM: id.size)


class SimulatedMicroscope:
    """A dSTORM or live-cell microscope in software: set the actuator attributes, then snap.

    The actuator state is plain attributes (activation_mw, excitation_mw,
    stage_z_um, angle_deg, channel) that the device adapters set between
    frames; the XY stage goes through ``move_stage_xy``, which keeps the field
    on the slide. ``config.mode`` picks the sample: "smlm" (blinking emitters
    on ``config.sample``, over the slide) or "live" (the tubular network of
    ``config.live``, then ``network`` is its TubularNetwork).
    """

    def __init__(
        self, config: SimulationConfig | None = None, seed: int = 0, *, keep_truth: bool = True
    ) -> None:
        self.config = config if config is not None else SimulationConfig()
        cam = self.config.camera
        # Separate streams: the sample depends on the seed alone, and camera noise
        # does not change the blinking.
        sample_seq, dye_seq, drift_seq, camera_seq, event_seq = np.random.SeedSequence(seed).spawn(5)
        self._dye_rng = np.random.default_rng(dye_seq)
        self._drift_rng = np.random.default_rng(drift_seq)
        self._camera_rng = np.random.default_rng(camera_seq)
        self.field_nm = (cam.width_px * cam.pixel_size_nm, cam.height_px * cam.pixel_size_nm)
        nx, ny = self.config.slide_fields
        self.slide_nm = (nx * self.field_nm[0], ny * self.field_nm[1])
        self._margin_nm = _MARGIN_SIGMAS * self.config.optics.sigma0_nm()
        self._illuminated: np.ndarray | None = None  # molecules under the lasers, ascending
        self._illuminated_for: tuple[float, float, float] | None = None  # (stage x, y, angle) they were found for
        self.network: TubularNetwork | None = None
        if self.config.mode == "live":
            self.network = TubularNetwork(
                self.config.live, self.field_nm, np.random.default_rng(sample_seq),
                np.random.default_rng(event_seq),
            )
            self.positions_nm = np.empty((0, 3))
        else:
            self.positions_nm = make_structure(
                self.config.sample, self.slide_nm, np.random.default_rng(sample_seq)
            )
        self._dose_mj = 0.0  # excitation dose so far (live mode bleaching)
        self.last_expected_photons: np.ndarray | None = None  # the noise-free image of the last snap
        self._state = np.full(len(self.positions_nm), _OFF, dtype=np.int8)
        self._dark_since_s = np.zeros(len(self.positions_nm))  # when each molecule left the lasers
        self._n_bleached = 0
        self._started = False
        self._drift_nm = 0.0  # sample displacement along z relative to the focal plane

        self.activation_mw = 0.0
        self.excitation_mw = 0.0
        self.stage_z_um = 0.0
        self.angle_deg = 0.0
        self.channel = "smlm"
        # The stage starts with the field at the slide's centre, where the sample is.
        self.stage_x_um = 0.5 * (nx - 1) * self.field_nm[0] / 1000.0
        self.stage_y_um = 0.5 * (ny - 1) * self.field_nm[1] / 1000.0
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
        """Molecules on the whole slide."""
        return int(self._state.size)

    @property
    def positions_nm(self) -> np.ndarray:
        """Molecule positions (N, 3) [x_nm, y_nm, z_nm] on the slide, before the rotation stage."""
        return self._positions_nm

    @positions_nm.setter
    def positions_nm(self, value: np.ndarray) -> None:
        # A replaced sample (e.g. mounted tilted) changes which molecules can reach the field.
        self._positions_nm = value
        self._z_extent_nm = float(np.abs(value[:, 2]).max()) if len(value) else 0.0
        self._illuminated_for = None

    @property
    def stage_range_um(self) -> tuple[float, float]:
        """Largest XY stage position (x_um, y_um) that keeps the field on the slide; the smallest is (0, 0)."""
        nx, ny = self.config.slide_fields
        return ((nx - 1) * self.field_nm[0] / 1000.0, (ny - 1) * self.field_nm[1] / 1000.0)

    def move_stage_xy(self, x_um: float, y_um: float) -> None:
        """Put the field's origin at (x_um, y_um) on the slide; ValueError where the field would leave it."""
        max_x, max_y = self.stage_range_um
        tol = _STAGE_TOLERANCE_UM
        if not (-tol <= x_um <= max_x + tol and -tol <= y_um <= max_y + tol):
            nx, ny = self.config.slide_fields
            raise ValueError(
                f"XY stage position ({x_um:g}, {y_um:g}) um would move the field off the slide "
                f"({nx} x {ny} fields of {self.field_nm[0] / 1000:g} x {self.field_nm[1] / 1000:g} um): "
                f"x must be in [0, {max_x:g}] and y in [0, {max_y:g}] um"
            )
        self.stage_x_um, self.stage_y_um = float(x_um), float(y_um)

    @property
    def bleached_fraction(self) -> float:
        """Fraction of the label bleached so far (the dye budget spent).

        SMLM: the fraction of the slide's molecules bleached; live: 1 - exp(-bleach_per_mj * dose_mJ).
        """
        if self.config.mode == "live":
            return float(-np.expm1(-self.config.live.bleach_per_mj * self._dose_mj))
        return self._n_bleached / self._state.size if self._state.size else 0.0

    @property
    def dose_mj(self) -> float:
        """Excitation dose delivered so far (mJ: mW x s of exposure; lasers are triggered)."""
        return self._dose_mj

    @property
    def focus_offset_nm(self) -> float:
        """Current defocus of the sample's z=0 plane (nm): stage minus drifted focal plane."""
        return (self.stage_z_um - self.config.focal_plane_um) * 1000.0 + self._drift_nm

    # ---- the frame -------------------------------------------------------
    def snap(
        self, exposure_ms: float, interval_ms: float | None = None
    ) -> tuple[np.ndarray, FrameTruth]:
        """Advance one frame period, max(exposure, interval), and image its exposure.

        Returns the (H, W) uint16 ADU frame and its ground truth; the same in
        both modes.
        """
        if not exposure_ms > 0:
            raise ValueError(f"exposure_ms must be > 0, got {exposure_ms}")
        if interval_ms is not None and interval_ms < 0:
            raise ValueError(f"interval_ms must be >= 0, got {interval_ms}")
        exposure_s = exposure_ms / 1000.0
        period_s = max(exposure_s, (interval_ms or 0.0) / 1000.0)
        if self.config.mode == "live":
            expected, truth = self._image_live(exposure_ms, period_s)
        else:
            expected, truth = self._image_smlm(exposure_ms, period_s)
        frame = photons_to_adu(expected, self.config.camera, self._camera_rng)
        self.last_expected_photons = expected
        if self.keep_truth:
            self.truth_log.append(truth)
        self.t_s += period_s
        self.frame_index += 1
        return frame, truth

    def _image_smlm(self, exposure_ms: float, period_s: float) -> tuple[np.ndarray, FrameTruth]:
        """Blink, bleach and drift through one frame period; the expected image and its truth."""
        cfg = self.config
        pp = cfg.photophysics
        exposure_s = exposure_ms / 1000.0
        activation_mw = max(0.0, float(self.activation_mw))
        excitation_mw = max(0.0, float(self.excitation_mw))
        k_on = pp.k_on_base_per_s + pp.k_on_per_mw_per_s * activation_mw
        photon_rate = pp.photons_per_mw_per_s * excitation_mw
        k_bleach = photon_rate * pp.bleach_per_photon

        if not self._started:
            p_on = k_on / (k_on + pp.k_off_per_s)
            self._state[self._dye_rng.random(self._state.size) < p_on] = _ON
            self._started = True
        under_lasers = self._under_lasers()
        if self.channel == "widefield":
            return self._image_widefield(under_lasers, exposure_ms, period_s, activation_mw, excitation_mw)

        focus_offset_nm = self._advance_drift(0.5 * exposure_s)  # mid-exposure
        lit, on_time_s = self._expose(under_lasers, exposure_s, k_on, pp.k_off_per_s, k_bleach)
        if period_s > exposure_s:
            self._relax(under_lasers, period_s - exposure_s, pp.k_on_base_per_s, pp.k_off_per_s)
        self._advance_drift(period_s - 0.5 * exposure_s)

        if photon_rate <= 0:
            lit, on_time_s = np.empty(0, np.int64), np.empty(0)
        photons = photon_rate * on_time_s
        pos = self._in_frame(lit)
        z_nm = pos[:, 2] + focus_offset_nm
        sigma_x_nm, sigma_y_nm = astigmatic_sigmas_nm(z_nm, cfg.optics)
        background = pp.background_photons_per_mw_per_s_per_px * excitation_mw * exposure_s

        expected = self.render(pos[:, 0], pos[:, 1], photons, sigma_x_nm, sigma_y_nm, background)

        inside = self._inside(pos)
        truth = self._truth(
            background, focus_offset_nm, exposure_ms, activation_mw, excitation_mw,
            id=lit[inside].astype(np.int64),
            x_nm=pos[inside, 0],
            y_nm=pos[inside, 1],
            z_nm=z_nm[inside],
            photons=photons[inside],
            sigma_x_nm=sigma_x_nm[inside],
            sigma_y_nm=sigma_y_nm[inside],
            n_emitting=int(np.count_nonzero(inside)),
        )
        return expected, truth

    def _image_widefield(
        self, under_lasers: np.ndarray, exposure_ms: float, period_s: float, activation_mw: float,
        excitation_mw: float,
    ) -> tuple[np.ndarray, FrameTruth]:
        """The ensemble image: every unbleached molecule under the lasers emits, none switches or bleaches.

        The whole frame period is dark time for the dye's switching, so the
        molecules only relax, and the next SMLM frame finds them as time left them.
        """
        cfg = self.config
        pp, px = cfg.photophysics, cfg.camera.pixel_size_nm
        exposure_s = exposure_ms / 1000.0
        focus_offset_nm = self._advance_drift(0.5 * exposure_s)  # mid-exposure
        self._relax(under_lasers, period_s, pp.k_on_base_per_s, pp.k_off_per_s)
        self._advance_drift(period_s - 0.5 * exposure_s)

        photons = pp.widefield_photons_per_mw_per_s * excitation_mw * exposure_s
        background = pp.background_photons_per_mw_per_s_per_px * excitation_mw * exposure_s
        expected = np.full(self.shape, float(background))
        emitting = under_lasers[self._state[under_lasers] != _BLEACHED] if photons > 0 else under_lasers[:0]
        pos = self._in_frame(emitting)
        render_dense_psf(
            self.shape, pos[:, 0] / px, pos[:, 1] / px, pos[:, 2] + focus_offset_nm, photons, cfg.optics, px,
            out=expected,
        )
        inside = self._inside(pos)
        empty = np.empty(0)
        truth = self._truth(
            background, focus_offset_nm, exposure_ms, activation_mw, excitation_mw,
            id=np.empty(0, np.int64), x_nm=empty, y_nm=empty, z_nm=empty, photons=empty,
            n_emitting=int(np.count_nonzero(inside)),
        )
        return expected, truth

    def _under_lasers(self) -> np.ndarray:
        """Molecules (ascending indices) that can appear within the field plus the margin at this stage and angle.

        Along the axis the rotation stage tilts, a slab of half-width
        (W/2 + margin + |sin a| z_max) / |cos a| about the field centre holds
        every molecule that projects into the field plus the margin (a few more
        at high angles); exact at 0 deg, and the whole sample on a one-field
        slide. Found again when the stage, the angle or the sample moves;
        molecules coming back under the lasers first relax over their time in
        the dark.
        """
        key = (self.stage_x_um, self.stage_y_um, self.angle_deg)
        if key == self._illuminated_for and self._illuminated is not None:
            return self._illuminated
        fw, fh = self.field_nm
        centre_x = self.stage_x_um * 1000.0 + 0.5 * fw
        centre_y = self.stage_y_um * 1000.0 + 0.5 * fh
        a = np.deg2rad(self.angle_deg)
        half_x, half_y = 0.5 * fw + self._margin_nm, 0.5 * fh + self._margin_nm
        widen = abs(np.sin(a)) * self._z_extent_nm
        if self.config.rotation_axis == "y":
            half_x = (half_x + widen) / abs(np.cos(a))
        else:
            half_y = (half_y + widen) / abs(np.cos(a))
        pos = self.positions_nm
        now = np.flatnonzero((np.abs(pos[:, 0] - centre_x) <= half_x) & (np.abs(pos[:, 1] - centre_y) <= half_y))
        if self._illuminated is not None:
            self._dark_since_s[self._illuminated] = self.t_s
        returning = now[self._dark_since_s[now] < self.t_s]
        if returning.size:
            pp = self.config.photophysics
            self._relax(returning, self.t_s - self._dark_since_s[returning], pp.k_on_base_per_s, pp.k_off_per_s)
        self._illuminated, self._illuminated_for = now, key
        return now

    def _in_frame(self, idx: np.ndarray) -> np.ndarray:
        """Positions (N, 3) of molecules idx in the frame: from the field's origin, turned by the rotation stage."""
        fw, fh = self.field_nm
        origin = np.array([self.stage_x_um * 1000.0, self.stage_y_um * 1000.0, 0.0])
        return rotate_positions(self.positions_nm[idx] - origin, self.angle_deg, self.config.rotation_axis,
                                (0.5 * fw, 0.5 * fh))

    def _inside(self, pos: np.ndarray) -> np.ndarray:
        """Which rows of pos (frame coordinates, nm) lie inside the frame."""
        return (pos[:, 0] >= 0) & (pos[:, 0] < self.field_nm[0]) & (pos[:, 1] >= 0) & (pos[:, 1] < self.field_nm[1])

    def _image_live(self, exposure_ms: float, period_s: float) -> tuple[np.ndarray, FrameTruth]:
        """Move, divide and bleach the network through one frame period; the expected image and its truth.

        Each centreline point carries the labelled volume pi (d/2)^2 * STEP_NM
        of its tubule slice; the slice's cross-section is two half-weight
        points at +-d/4 across the tubule (the variance of a filled cylinder's
        projection), all blurred by the defocus-dependent PSF.
        """
        cfg = self.config
        live, cam, net = cfg.live, cfg.camera, self.network
        assert net is not None
        exposure_s = exposure_ms / 1000.0
        activation_mw = max(0.0, float(self.activation_mw))
        excitation_mw = max(0.0, float(self.excitation_mw))
        t_mid = self.t_s + 0.5 * exposure_s
        focus_offset_nm = self._advance_drift(0.5 * exposure_s)  # mid-exposure
        net.advance_to(t_mid)
        # Bleaching: fluorescence exp(-k * dose) averaged over this exposure's dose.
        dose_mj = excitation_mw * exposure_s
        k_dose = live.bleach_per_mj * dose_mj
        mean_fluorescence = np.exp(-live.bleach_per_mj * self._dose_mj) * (
            -np.expm1(-k_dose) / k_dose if k_dose > 0 else 1.0
        )
        self._dose_mj += dose_mj
        self._advance_drift(period_s - 0.5 * exposure_s)

        centre = (0.5 * self.field_nm[0], 0.5 * self.field_nm[1])
        pos, diameter = net.geometry(t_mid)
        pos = rotate_positions(pos, self.angle_deg, cfg.rotation_axis, centre)
        tangent = net.tangents(pos)
        background = live.background_photons_per_mw_per_s_per_px * excitation_mw * exposure_s
        expected = np.full(self.shape, float(background))
        photon_scale = live.photons_per_mw_per_s_per_um3 * excitation_mw * exposure_s * mean_fluorescence
        lit = np.flatnonzero(diameter > 0) if photon_scale > 0 else np.empty(0, np.int64)
        if lit.size:
            d = diameter[lit]
            photons = (np.pi / 4e9 * STEP_NM * photon_scale * 0.5) * d**2  # per half of the slice
            across = np.column_stack([-tangent[lit, 1], tangent[lit, 0]])
            norm = np.hypot(across[:, 0], across[:, 1])
            across = np.where(norm[:, None] > 1e-6, across / np.maximum(norm, 1e-6)[:, None], [1.0, 0.0])
            offset = (0.25 * d)[:, None] * across
            px = cam.pixel_size_nm
            xy = np.concatenate([pos[lit, :2] + offset, pos[lit, :2] - offset]) / px
            z = np.tile(pos[lit, 2] + focus_offset_nm, 2)
            render_dense_psf(self.shape, xy[:, 0], xy[:, 1], z, np.tile(photons, 2), cfg.optics, px, out=expected)

        events = []
        for ev in net.active:
            phase = ev.phase(t_mid)
            if phase is None:
                continue
            where = ev.base_nm.copy()
            where[:2] += net.displacement_nm(where[None, :2], t_mid)[0]
            where = rotate_positions(where[None], self.angle_deg, cfg.rotation_axis, centre)[0]
            if not (0 <= where[0] < self.field_nm[0] and 0 <= where[1] < self.field_nm[1]):
                continue
            on_tubule = np.flatnonzero(net.segment == ev.segment)
            nearest = on_tubule[np.argmin(np.abs(net.s_nm[on_tubule] - ev.s_nm))]
            direction = np.degrees(np.arctan2(tangent[nearest, 1], tangent[nearest, 0])) % 180.0
            events.append(EventTruth(
                id=ev.id, x_nm=float(where[0]), y_nm=float(where[1]),
                z_nm=float(where[2] + focus_offset_nm), phase=phase, onset_s=ev.onset_s,
                division_s=ev.division_s, end_s=ev.end_s,
                neck_width_nm=net.neck_width_nm(ev, t_mid), direction_deg=float(direction),
            ))  # fmt: skip

        empty = np.empty(0)
        truth = self._truth(
            background, focus_offset_nm, exposure_ms, activation_mw, excitation_mw,
            id=np.empty(0, np.int64), x_nm=empty, y_nm=empty, z_nm=empty, photons=empty,
            mode="live", events=events,
        )
        return expected, truth

    def _truth(self, background: float, focus_offset_nm: float, exposure_ms: float, activation_mw: float,
               excitation_mw: float, **specific) -> FrameTruth:
        """This frame's truth: the conditions every mode records, plus the mode's own fields."""
        cam = self.config.camera
        return FrameTruth(
            frame=self.frame_index,
            t_s=self.t_s,
            background_per_px=float(background),
            focus_offset_nm=float(focus_offset_nm),
            exposure_ms=float(exposure_ms),
            pixel_size_nm=cam.pixel_size_nm,
            qe=cam.qe,
            em_excess=2.0 if cam.em_gain > 1 else 1.0,
            activation_mw=activation_mw,
            excitation_mw=excitation_mw,
            stage_z_um=float(self.stage_z_um),
            angle_deg=float(self.angle_deg),
            fluorescence_remaining=1.0 - self.bleached_fraction,
            stage_x_um=float(self.stage_x_um),
            stage_y_um=float(self.stage_y_um),
            channel=self.channel,
            **specific,
        )

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
        self, under_lasers: np.ndarray, exposure_s: float, k_on: float, k_off: float, k_bleach: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Telegraph the molecules under the lasers through the exposure; return those on and their on-times (s).

        Continuous time: exponential waiting times, looping only over the
        (few) molecules that are on or switch on inside the window. The off
        molecules that switch on are picked without visiting the others: each
        does so with probability p = 1 - exp(-k_on T), so the picks are
        Bernoulli(p) trials drawn by geometric skipping, and their switch-on
        times are exponential times truncated to the window. Leaving the on
        state is off (k_off) or bleached (k_bleach = photon rate x bleach per photon).
        Returns (molecule ids ascending, on-time in s), only molecules with on-time > 0.
        """
        state, rng = self._state[under_lasers], self._dye_rng
        p_switch = -np.expm1(-k_on * exposure_s)
        picked = _bernoulli_indices(state.size, p_switch, rng)
        picked = picked[state[picked] == _OFF]
        t_picked = -np.log1p(-rng.random(picked.size) * p_switch) / k_on if picked.size else np.empty(0)
        already_on = np.flatnonzero(state == _ON)
        involved = np.concatenate([already_on, picked])
        local = np.full(involved.size, _ON, dtype=np.int8)  # the states of `involved`, as the loop runs
        on_time = np.zeros(involved.size)
        j = np.arange(involved.size)  # positions in `involved` still switching inside the window
        t = np.concatenate([np.zeros(already_on.size), t_picked])
        k_leave = k_off + k_bleach
        p_bleach = k_bleach / k_leave
        while j.size:
            is_on = local[j] == _ON
            rate = np.where(is_on, k_leave, k_on)
            with np.errstate(divide="ignore"):
                t_next = t + rng.standard_exponential(j.size) / rate
            if is_on.any():
                on_time[j[is_on]] += np.minimum(t_next[is_on], exposure_s) - t[is_on]
            switched = t_next < exposure_s
            j, t, is_on = j[switched], t_next[switched], is_on[switched]
            if not j.size:
                break
            bleached = rng.random(j.size) < p_bleach
            local[j] = np.where(is_on, np.where(bleached, _BLEACHED, _OFF), _ON)
            keep = local[j] != _BLEACHED
            j, t = j[keep], t[keep]
        self._state[under_lasers[involved]] = local
        self._n_bleached += int(np.count_nonzero(local == _BLEACHED))
        order = np.argsort(involved)
        involved, on_time = involved[order], on_time[order]
        lit = on_time > 0
        return under_lasers[involved[lit]], on_time[lit]

    def _relax(self, idx: np.ndarray, dark_s: float | np.ndarray, k_on: float, k_off: float) -> None:
        """Molecules idx spend dark_s (s: one for all, or one each) in the dark: exact two-state relaxation."""
        alive = self._state[idx] != _BLEACHED
        idx = idx[alive]
        k_sum = k_on + k_off
        p_inf = k_on / k_sum
        decay = np.exp(-k_sum * (dark_s if np.ndim(dark_s) == 0 else dark_s[alive]))
        p_on = p_inf + ((self._state[idx] == _ON) - p_inf) * decay
        self._state[idx] = np.where(self._dye_rng.random(idx.size) < p_on, _ON, _OFF)


def _bernoulli_indices(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """Indices 0..n-1 each picked independently with probability p, in O(n p) for small p.

    The gaps between successive picks of Bernoulli(p) trials are Geometric(p).
    """
    if n == 0 or p <= 0:
        return np.empty(0, np.int64)
    if p < 1e-12:  # gaps would pass int64 (they saturate from p ~ 1e-19: a loop for ever): how many, then which
        k = int(rng.binomial(n, p))
        return np.sort(rng.choice(n, k, replace=False)) if k else np.empty(0, np.int64)
    if p >= 0.2:
        return np.flatnonzero(rng.random(n) < p)
    expected = n * p
    chunk = int(expected + 6.0 * np.sqrt(expected) + 16)
    parts, last = [], -1
    while True:
        picks = last + np.cumsum(rng.geometric(p, chunk))
        if picks[-1] >= n:
            parts.append(picks[picks < n])
            return np.concatenate(parts)
        parts.append(picks)
        last = int(picks[-1])


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


EVENT_COLUMNS = (
    "frame", "id", "x [nm]", "y [nm]", "phase", "z [nm]", "t [s]",
    "onset [s]", "division [s]", "end [s]", "neck width [nm]", "direction [deg]",
)  # fmt: skip


def events_table(truths: list[FrameTruth]) -> dict[str, np.ndarray]:
    """Fission events per frame (live mode), one row per event active in a frame.

    Columns: frame (0-based), id (the event, stable across frames), x [nm],
    y [nm] (the neck in the image frame), phase ("constricting"/"dividing"),
    then z [nm] (defocus), t [s] (the frame's exposure start), onset [s],
    division [s] (when the tubule divides), end [s], neck width [nm] and
    direction [deg] (the tubule's axis). Columns in EVENT_COLUMNS order.
    """
    rows = [(t, e) for t in truths for e in t.events]
    values: dict[str, list] = {c: [] for c in EVENT_COLUMNS}
    for t, e in rows:
        for column, value in zip(EVENT_COLUMNS, (
            t.frame, e.id, e.x_nm, e.y_nm, e.phase, e.z_nm, t.t_s, e.onset_s, e.division_s,
            e.end_s, e.neck_width_nm, e.direction_deg,
        ), strict=True):  # fmt: skip
            values[column].append(value)
    dtypes = {"frame": np.int64, "id": np.int64, "phase": str}
    return {c: np.asarray(v, dtype=dtypes.get(c, np.float64)) for c, v in values.items()}
