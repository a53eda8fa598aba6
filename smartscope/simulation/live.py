"""Live mode: a mitochondria-like tubular network that moves slowly and divides.

The network is a set of tubules (segments). Each is a centreline sampled every
`STEP_NM` of arc length s (a worm-like chain), with a diameter per point;
side branches are tubules that start on their parent. Tubule ends are
hemispherical caps. The labelled volume of a point is
pi * (diameter / 2)**2 * STEP_NM, so brightness follows the cross-section: a
neck that halves the diameter quarters the light there.

Motion: every point moves with a smooth, spatially correlated deformation
field (a few travelling sine modes: rms speed `motion_nm_per_s`, rms
excursion `motion_amplitude_nm`) plus a uniform lateral drift. Positions are a
closed-form function of time, so any frame interval gives the same sample.

Fission: onsets form a Poisson process in time and along the tubules
(`fission_rate_per_um_per_s` per um of tubule that can still divide: at least
`min_fragment_um` + `retraction_nm` from an end and away from other ongoing
events); an event first constricts (the diameter at a
Gaussian neck shrinks linearly from the tubule's to `neck_width_nm` over
`constriction_s`), then divides: the tubule is cut at the neck and the two new,
rounded ends retract by `retraction_nm` over `division_s`. After that the
tubule is two tubules and may divide again. So that the network does not
fragment for good over a long run, the two ends of a division fuse back after
an exponential time (mean `fusion_s`): the gap closes over `division_s`, the
reverse of the retraction. Fusion is not a fission event: it is not in the
event truth (a fission detector should not fire on it).

Coordinates are the sample frame of `sample.py` (nm; x, y in the field with the
pixel convention x_nm = x_px * pixel_size_nm, z centred on 0); the
microscope rotates and projects them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from smartscope.simulation.config import LiveConfig

STEP_NM = 100.0  # centreline sampling: below the PSF width (~130 nm), so lines and necks render smoothly
MARGIN_NM = 1500.0  # the network also fills a margin around the field: it enters from outside
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_MOTION_MODES = 4
_MOTION_WAVELENGTH_UM = (8.0, 20.0)  # deformation varies slowly in space: tubules bend, not tear


@dataclass(frozen=True)
class EventTruth:
    """One fission event active in a frame, as the image shows it.

    x_nm, y_nm is the neck's current position in the image frame (after motion
    and rotation; pixel convention as in FrameTruth) and z_nm its defocus.
    ``division_s`` is the absolute time at which the tubule divides (onset +
    constriction), ``end_s`` when the new ends have retracted and the event is over.
    """

    id: int
    x_nm: float
    y_nm: float
    z_nm: float
    phase: str  # "constricting" (onset_s <= t < division_s) or "dividing" (division_s <= t < end_s)
    onset_s: float
    division_s: float
    end_s: float
    neck_width_nm: float  # current diameter at the neck (0 once divided)
    direction_deg: float  # in-plane direction of the tubule axis at the event, [0, 180)


@dataclass
class FissionEvent:
    """A fission event in the sample frame (what the simulation knows; see EventTruth)."""

    id: int
    point: int  # index of the centreline point at the neck (point indices never change)
    segment: int
    s_nm: float  # arc position of the neck on its segment
    base_nm: np.ndarray  # (3,) position of the neck at t = 0 (before motion)
    width_nm: float  # the tubule's diameter at the neck before constriction
    onset_s: float
    division_s: float
    end_s: float

    def phase(self, t_s: float) -> str | None:
        if t_s < self.onset_s or t_s >= self.end_s:
            return None
        return "constricting" if t_s < self.division_s else "dividing"


@dataclass
class _Fusion:
    """The two ends left by a division joining again: the gap closes over [start_s, end_s)."""

    point: int  # the point at the old neck: its segment is the left end's, point + 1's the right end's
    s_nm: float
    start_s: float
    end_s: float
    segment: int = -1  # the merged tubule, once started


class TubularNetwork:
    """The live sample: geometry, motion and fission of a tubular network.

    `advance_to(t)` runs the fission process up to time t (call with
    increasing times); `geometry(t)` then gives the labelled points at t.
    """

    def __init__(
        self,
        config: LiveConfig,
        field_nm: tuple[float, float],
        structure_rng: np.random.Generator,
        event_rng: np.random.Generator,
    ) -> None:
        self.config = config
        self.field_nm = (float(field_nm[0]), float(field_nm[1]))
        self._event_rng = event_rng
        self._generate(structure_rng)
        self._make_motion(structure_rng)
        self.events: list[FissionEvent] = []  # every event so far, in onset order
        self.active: list[FissionEvent] = []  # onset <= t < end
        self._fusions: list[_Fusion] = []  # scheduled or closing gaps
        self.t_s = 0.0  # the fission process has run up to here
        self._next_draw_s = 0.0  # with fission_step_s: when the next grid step draws its onsets
        self._pending_onsets_s: list[float] = []  # drawn onsets still to come
        # Integral of (length that can divide) dt over the run so far, or with
        # fission_step_s to the end of the current grid step (um*s): the
        # expected number of onsets is fission_rate_per_um_per_s times this.
        self.fissionable_um_s = 0.0

    # ---- structure ------------------------------------------------------
    def _generate(self, rng: np.random.Generator) -> None:
        cfg = self.config
        width, height = self.field_nm
        area_um2 = (width + 2 * MARGIN_NM) * (height + 2 * MARGIN_NM) / 1e6
        target_um = cfg.length_density_um_per_um2 * area_um2
        stiffness = np.sqrt(STEP_NM / (cfg.persistence_length_um * 1000.0))
        chains: list[np.ndarray] = []  # (n, 3) centrelines
        widths: list[np.ndarray] = []
        total_um = 0.0
        while total_um < target_um:
            length_um = rng.uniform(cfg.tubule_length_min_um, cfg.tubule_length_max_um)
            start = np.array(
                [rng.uniform(-MARGIN_NM, width + MARGIN_NM), rng.uniform(-MARGIN_NM, height + MARGIN_NM)]
            )
            z_start = rng.uniform(-0.25, 0.25) * cfg.z_range_nm
            xyz, angles = self._worm(start, z_start, rng.uniform(0, 2 * np.pi), length_um, stiffness, rng)
            chains.append(xyz)
            widths.append(self._widths(len(xyz), rng))
            total_um += length_um
            for _ in range(rng.poisson(cfg.branches_per_um * length_um)):
                at = rng.integers(int(0.15 * len(xyz)), max(int(0.85 * len(xyz)), int(0.15 * len(xyz)) + 1))
                turn = rng.choice([-1.0, 1.0]) * rng.uniform(np.deg2rad(40), np.deg2rad(90))
                branch_um = cfg.branch_length_um * rng.uniform(0.5, 1.5)
                b_xyz, _ = self._worm(xyz[at, :2], xyz[at, 2], angles[at] + turn, branch_um, stiffness, rng)
                chains.append(b_xyz)
                widths.append(self._widths(len(b_xyz), rng))
                total_um += branch_um
        counts = np.array([len(c) for c in chains])
        self.chain = np.repeat(np.arange(len(chains)), counts)  # the tubule each point was made on (fixed)
        self.segment = self.chain.copy()  # the tubule it belongs to now (divisions and fusions change it)
        self.s_nm = np.concatenate([np.arange(n) * STEP_NM for n in counts])
        self.base_nm = np.concatenate(chains)  # (N, 3) at t = 0
        self.width_nm = np.concatenate(widths)  # diameter per point, before events and end caps
        self.seg_start_nm = np.zeros(len(chains))  # current arc extent of each segment
        self.seg_end_nm = (counts - 1) * STEP_NM
        self._refresh_static()

    def _worm(
        self,
        start_xy: np.ndarray,
        z_start: float,
        angle: float,
        length_um: float,
        stiffness: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A worm-like chain from start_xy: (n, 3) centreline and (n,) tangent angles."""
        n = max(2, int(round(length_um * 1000.0 / STEP_NM)) + 1)
        angles = angle + np.concatenate([[0.0], np.cumsum(rng.normal(0.0, stiffness, n - 1))])
        x = start_xy[0] + np.concatenate([[0.0], np.cumsum(np.cos(angles[:-1]))]) * STEP_NM
        y = start_xy[1] + np.concatenate([[0.0], np.cumsum(np.sin(angles[:-1]))]) * STEP_NM
        half_z = 0.5 * self.config.z_range_nm
        s = np.arange(n) * STEP_NM
        wavelength = rng.uniform(3000.0, 8000.0)
        phase = rng.uniform(0, 2 * np.pi)
        amplitude = rng.uniform(0.0, 0.5) * half_z
        z = z_start + amplitude * (np.sin(2 * np.pi * s / wavelength + phase) - np.sin(phase))
        return np.column_stack([x, y, np.clip(z, -half_z, half_z)]), angles

    def _widths(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Diameters along one tubule: its own width with a smooth rms variation."""
        cfg = self.config
        s = np.arange(n) * STEP_NM
        wavelengths = rng.uniform(500.0, 2000.0, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        wobble = np.sqrt(2.0 / 3.0) * np.sin(2 * np.pi * s[:, None] / wavelengths + phases).sum(axis=1)
        factor = np.clip(1.0 + cfg.width_variation * wobble, 0.5, None)
        return rng.uniform(cfg.tubule_width_min_nm, cfg.tubule_width_max_nm) * factor

    def _refresh_static(self) -> None:
        """Per-point quantities that change only when a tubule divides."""
        start = self.seg_start_nm[self.segment]
        end = self.seg_end_nm[self.segment]
        self._end_distance_nm = np.minimum(self.s_nm - start, end - self.s_nm)
        self._static_width_nm = self.width_nm * _cap(self._end_distance_nm, 0.5 * self.width_nm)
        same_prev = np.r_[False, self.segment[1:] == self.segment[:-1]]
        same_next = np.r_[self.segment[:-1] == self.segment[1:], False]
        idx = np.arange(self.segment.size)
        self._prev = np.where(same_prev, idx - 1, idx)  # neighbours on the same tubule (for tangents)
        self._next = np.where(same_next, idx + 1, idx)

    @property
    def length_um(self) -> float:
        """Total tubule length now (um), including the margin around the field."""
        return float(np.sum(self.seg_end_nm - self.seg_start_nm)) / 1000.0

    # ---- motion ---------------------------------------------------------
    def _make_motion(self, rng: np.random.Generator) -> None:
        cfg = self.config
        m = _MOTION_MODES
        wavelengths = rng.uniform(*_MOTION_WAVELENGTH_UM, m) * 1000.0
        directions = rng.uniform(0, 2 * np.pi, m)
        self._k = (2 * np.pi / wavelengths)[:, None] * np.column_stack([np.cos(directions), np.sin(directions)])
        polar = rng.uniform(0, 2 * np.pi, m)
        self._polar = np.column_stack([np.cos(polar), np.sin(polar)])  # (m, 2) displacement directions
        self._phase0 = rng.uniform(0, 2 * np.pi, m)
        # rms displacement sqrt(sum a^2 / 2) = amplitude; rms speed = amplitude * rms(omega) = speed
        self._amp = cfg.motion_amplitude_nm * np.sqrt(2.0 / m)
        speeds = rng.uniform(0.5, 1.5, m)
        omega0 = cfg.motion_nm_per_s / cfg.motion_amplitude_nm
        self._omega = omega0 * speeds / np.sqrt(np.mean(speeds**2)) * rng.choice([-1.0, 1.0], m)
        phase = self.base_nm[:, :2] @ self._k.T + self._phase0  # (N, m)
        self._base_sin, self._base_cos = np.sin(phase), np.cos(phase)

    def _shift(self, sin_phase: np.ndarray, cos_phase: np.ndarray, t_s: float) -> np.ndarray:
        """Displacement (n, 2) at t of points whose mode phases at t = 0 have these sines/cosines.

        sin(phase + w t) - sin(phase) = sin(phase) (cos(w t) - 1) + cos(phase) sin(w t):
        two small matrix products, no transcendental functions per point.
        """
        cfg = self.config
        if cfg.motion_nm_per_s > 0 and t_s != 0:
            wt = self._omega * t_s
            to_xy = self._amp * self._polar  # (m, 2)
            shift = sin_phase @ ((np.cos(wt) - 1.0)[:, None] * to_xy) + cos_phase @ (np.sin(wt)[:, None] * to_xy)
        else:
            shift = np.zeros((sin_phase.shape[0], 2))
        shift[:, 0] += cfg.drift_x_nm_per_s * t_s
        shift[:, 1] += cfg.drift_y_nm_per_s * t_s
        return shift

    def displacement_nm(self, base_xy_nm: np.ndarray, t_s: float) -> np.ndarray:
        """Lateral displacement (n, 2) at time t of material that was at base_xy_nm (n, 2) at t = 0."""
        phase = np.atleast_2d(base_xy_nm) @ self._k.T + self._phase0
        return self._shift(np.sin(phase), np.cos(phase), t_s)

    def positions_nm(self, t_s: float) -> np.ndarray:
        """(N, 3) centreline points at time t (sample frame)."""
        pos = self.base_nm.copy()
        pos[:, :2] += self._shift(self._base_sin, self._base_cos, t_s)
        return pos

    # ---- fission --------------------------------------------------------
    def _fissionable(self) -> np.ndarray:
        """Mask of centreline points where a new event may start now."""
        cfg = self.config
        end_gap = cfg.min_fragment_um * 1000.0 + cfg.retraction_nm
        ok = self._end_distance_nm >= end_gap
        keep_apart = max(cfg.min_fragment_um * 1000.0 + 2 * cfg.retraction_nm, 2 * cfg.neck_length_nm)
        for ev in self.active:
            ok &= ~((self.segment == ev.segment) & (np.abs(self.s_nm - ev.s_nm) < keep_apart))
        for fusion in self._fusions:
            if fusion.segment >= 0:
                ok &= ~((self.segment == fusion.segment) & (np.abs(self.s_nm - fusion.s_nm) < keep_apart))
        return ok

    def advance_to(self, t_s: float) -> None:
        """Run the fission process from self.t_s to t_s: finish events, start new ones.

        Everything happens in time order: events end, gaps close, and (with
        `fission_step_s`) each grid step draws its onsets when it begins and
        each onset picks its place when it comes. So the events do not depend
        on how the calls split the time.
        """
        if t_s <= self.t_s:
            return
        step_s = self.config.fission_step_s
        while True:
            due = [(e.end_s, 0, e) for e in self.active if e.end_s <= t_s]
            due += [(f.start_s, 1, f) for f in self._fusions if f.segment < 0 and f.start_s <= t_s]
            due += [(f.end_s, 2, f) for f in self._fusions if f.segment >= 0 and f.end_s <= t_s]
            if step_s is not None:
                due += [(o, 3, o) for o in self._pending_onsets_s if o <= t_s]
                if self._next_draw_s <= t_s:
                    due.append((self._next_draw_s, 4, None))
            if not due:
                break
            time_s, kind, item = min(due, key=lambda d: (d[0], d[1]))
            if kind == 0:
                self._divide(item)
                self.active.remove(item)
            elif kind == 1:
                self._join(item)
            elif kind == 2:
                self._fusions.remove(item)
            elif kind == 3:
                self._pending_onsets_s.remove(item)
                self._start_somewhere(item)
            else:
                self._pending_onsets_s += self._draw_onsets(time_s, time_s + step_s)
                self._next_draw_s = time_s + step_s
        if step_s is None:
            for onset in self._draw_onsets(self.t_s, t_s):
                self._start_somewhere(onset)
        self.t_s = t_s

    def _draw_onsets(self, t0_s: float, t1_s: float) -> list[float]:
        """Poisson onsets in [t0, t1) for the length that can divide at t0, sorted."""
        rate = self.config.fission_rate_per_um_per_s
        if rate <= 0:
            return []
        length_um = np.count_nonzero(self._fissionable()) * STEP_NM / 1000.0
        self.fissionable_um_s += length_um * (t1_s - t0_s)
        n_new = self._event_rng.poisson(rate * length_um * (t1_s - t0_s))
        return sorted(float(t) for t in self._event_rng.uniform(t0_s, t1_s, n_new))

    def _start_somewhere(self, onset_s: float) -> None:
        """Start an event at a random place that can divide now (none: no event)."""
        candidates = np.flatnonzero(self._fissionable())
        if candidates.size:
            self._start(int(candidates[self._event_rng.integers(candidates.size)]), onset_s)

    def _start(self, point: int, onset_s: float) -> None:
        cfg = self.config
        ev = FissionEvent(
            id=len(self.events),
            point=point,
            segment=int(self.segment[point]),
            s_nm=float(self.s_nm[point]),
            base_nm=self.base_nm[point].copy(),
            width_nm=float(self.width_nm[point]),
            onset_s=onset_s,
            division_s=onset_s + cfg.constriction_s,
            end_s=onset_s + cfg.constriction_s + cfg.division_s,
        )
        self.events.append(ev)
        self.active.append(ev)

    def _divide(self, ev: FissionEvent) -> None:
        """The event is over: its tubule becomes two tubules, and their fusion is scheduled.

        The gap's points stay (point indices never change) but lie beyond
        both new tubules' ends, so they carry no dye until the gap closes.
        """
        r = self.config.retraction_nm
        right = (self.segment == ev.segment) & (self.s_nm > ev.s_nm)
        new_id = self.seg_start_nm.size
        self.seg_start_nm = np.append(self.seg_start_nm, ev.s_nm + r)
        self.seg_end_nm = np.append(self.seg_end_nm, self.seg_end_nm[ev.segment])
        self.seg_end_nm[ev.segment] = ev.s_nm - r
        self.segment = np.where(right, new_id, self.segment)
        for other in [*self.active, *self._fusions]:
            if other is not ev and other.segment == ev.segment and other.s_nm > ev.s_nm:
                other.segment = new_id
        self._refresh_static()
        if self.config.fusion_s is not None:
            start = ev.end_s + self._event_rng.exponential(self.config.fusion_s)
            self._fusions.append(_Fusion(ev.point, ev.s_nm, start, start + self.config.division_s))

    def _join(self, fusion: _Fusion) -> None:
        """The gap starts to close: the two tubules are one again, the gap's dye returns gradually."""
        left, right = int(self.segment[fusion.point]), int(self.segment[fusion.point + 1])
        if left == right:  # cannot happen (a gap is never divided again); keep the state sane
            self._fusions.remove(fusion)
            return
        self.segment = np.where(self.segment == right, left, self.segment)
        self.seg_end_nm[left] = self.seg_end_nm[right]
        self.seg_start_nm[right] = self.seg_end_nm[right] = 0.0  # an id no point uses any more
        for other in [*self.active, *self._fusions]:
            if other.segment == right:
                other.segment = left
        fusion.segment = left
        self._refresh_static()

    # ---- the sample at time t -------------------------------------------
    def geometry(self, t_s: float) -> tuple[np.ndarray, np.ndarray]:
        """Centreline points (N, 3) at time t and their current diameters (N,) in nm.

        Points of a divided-away gap, and the very tips of tubules, have diameter 0.
        """
        pos = self.positions_nm(t_s)
        width = self._static_width_nm.copy()
        for ev in self.active:
            phase = ev.phase(t_s)
            if phase is None:
                continue
            sel = np.flatnonzero(self.segment == ev.segment)
            width[sel] *= self._event_profile(ev, self.s_nm[sel], 0.5 * self.width_nm[sel], t_s)
        for fusion in self._fusions:
            if fusion.segment < 0:
                continue
            sel = np.flatnonzero(self.segment == fusion.segment)
            closing = min(1.0, max(0.0, (fusion.end_s - t_s) / self.config.division_s))
            gap = self.config.retraction_nm * closing
            width[sel] *= _cap(np.abs(self.s_nm[sel] - fusion.s_nm) - gap, 0.5 * self.width_nm[sel])
        return pos, width

    def _event_profile(self, ev: FissionEvent, s_nm: np.ndarray, radius_nm: np.ndarray, t_s: float) -> np.ndarray:
        """Multiplier of the diameter along the event's tubule at time t."""
        cfg = self.config
        sigma = cfg.neck_length_nm / _FWHM_PER_SIGMA
        neck = np.exp(-0.5 * ((s_nm - ev.s_nm) / sigma) ** 2)
        depth = 1.0 - min(cfg.neck_width_nm / ev.width_nm, 1.0)  # relative narrowing at division
        if t_s < ev.division_s:
            progress = (t_s - ev.onset_s) / cfg.constriction_s
            return 1.0 - depth * progress * neck
        progress = (t_s - ev.division_s) / cfg.division_s
        gap = cfg.retraction_nm * progress
        relaxing = 1.0 - depth * (1.0 - progress) * neck  # the neck's remains round up
        return relaxing * _cap(np.abs(s_nm - ev.s_nm) - gap, radius_nm)

    def neck_width_nm(self, ev: FissionEvent, t_s: float) -> float:
        """The neck's current diameter (nm): shrinking while constricting, 0 once divided."""
        if t_s >= ev.division_s:
            return 0.0
        depth = 1.0 - min(self.config.neck_width_nm / ev.width_nm, 1.0)
        return ev.width_nm * (1.0 - depth * max(0.0, (t_s - ev.onset_s) / self.config.constriction_s))

    def tangents(self, pos: np.ndarray) -> np.ndarray:
        """Unit tangents (N, 3) of the centrelines through pos (points ordered along tubules)."""
        d = pos[self._next] - pos[self._prev]
        norm = np.linalg.norm(d, axis=1, keepdims=True)
        return d / np.where(norm > 0, norm, 1.0)


def _cap(distance_nm: np.ndarray, radius_nm: np.ndarray | float) -> np.ndarray:
    """Diameter multiplier of a hemispherical end cap at distance_nm from the tip (0 beyond it)."""
    d = np.clip(distance_nm, 0.0, None)
    inside = np.clip(d * (2.0 * radius_nm - d), 0.0, None)
    return np.where(d < radius_nm, np.sqrt(inside) / radius_nm, 1.0)
