"""An independent live-imaging world: the event detector's held-out test, never trained or tuned on.

Written apart from the training simulator (`live.py`, `microscope.py`,
`optics.py`, and the randomisation of `training/episodes.py`), so a score here
says how the detector does on data our own simulator did not draw:

- structure: each tubule a cubic spline through the control points of a
  persistent random walk (1 µm steps), a third of them branching off an
  earlier one, over a field 2 µm larger than the image each side (so
  tubules cross every edge); not worm-like chains;
- motion: every control point follows its own Ornstein-Uhlenbeck walk
  (correlation time 60-120 s), the tubule between them interpolated, plus a
  uniform drift; not travelling sine modes;
- fission: at most one per tubule; the neck narrows with a cosine ease (not
  linearly) to nothing, then a gap opens between two tapered ends;
- rendering: the projected cylinder (chord length across the tube) deposited
  on a 2x supersampled grid, convolved with an Airy PSF (scalar Born-Wolf, in
  focus, from the wavelength and NA), out-of-focus tubules further blurred
  by a geometric defocus disk, binned to camera pixels; haze; vignetting
  (cos^4) with a linear tilt; not Gaussian PSFs;
- camera: sCMOS with per-pixel gain, offset and read-noise maps, or EMCCD;
  frames come back as photons estimated with the camera's mean gain and
  offset only, as a pipeline that knows the datasheet would.

Outside the training ranges (`training.episodes.RANDOMISATION`) on four
axes: the frame interval (15.5-20 s, training 0.2-15 s), the constriction
duration (100-150 s, training 3-90 s), the network density (2.2-3 µm/µm²,
training 0.2-2) and bleaching over the run (75-90 % lost, training 0-70 %).
(Until events v4 the training stopped at 10 s and 30 s, and this world at
10.5-15 s and 40-90 s; v4's training took those in, so the world moved on.)
Fields of 128 px (training tiles 64 px). Ground truth per frame: the active
events (constricting or dividing) with their neck positions, in the pixel
convention of the training episodes (pixel k covers [k, k+1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import make_interp_spline
from scipy.ndimage import gaussian_filter
from scipy.signal import fftconvolve
from scipy.special import j1

#: the held-out world's parameter ranges (uniform unless said)
WORLD = {
    "field_px": 128,
    "pixel_size_nm": (50.0, 120.0),
    "wavelength_nm": (500.0, 600.0), "na": (1.2, 1.49),
    "interval_s": (15.5, 20.0),  # OUT of the training range (0.2-15 s)
    "constriction_s": (100.0, 150.0),  # OUT of the training range (3-90 s)
    "division_s": (10.0, 20.0),
    "length_density_um_per_um2": (2.2, 3.0),  # OUT of the training range (0.2-2)
    "bleach_lost": (0.75, 0.9),  # fraction lost over the episode, OUT of the training range (0-0.7)
    "tubule_diameter_nm": (200.0, 450.0),
    "tubule_length_um": (2.0, 8.0),
    "branch_fraction": 0.33,
    "z_half_range_nm": 400.0,
    "motion_rms_nm": (100.0, 300.0), "motion_tau_s": (60.0, 120.0), "drift_nm_per_s": (-15.0, 15.0),
    "active_events_per_um": (0.04, 0.15),  # expected events in progress per µm of tubule
    "peak_photons": (40.0, 400.0),  # in-focus photons per pixel at the axis of a 300 nm tubule, log-uniform
    "background_photons": (2.0, 40.0),  # per pixel, log-uniform
    "haze_fraction": (0.1, 0.6), "haze_sigma_um": (1.0, 3.0),
    "vignetting": (0.0, 0.4), "tilt": (0.0, 0.3),
    "emccd_fraction": 0.3,
}
MARGIN_UM = 2.0
STEP_UM = 1.0  # control-point spacing
SUPERSAMPLE = 2
_GAP_NM = (400.0, 700.0)
# the geometric defocus disk, dz tan(theta), overstates the blur near focus, where diffraction rules
DEFOCUS_BLUR = 0.6
FISSION_MAX_Z_NM = 300.0  # divisions only on tubules near focus: those a person marking them could see  # how far apart the two ends end up after a division


@dataclass
class _Tubule:
    control_um: np.ndarray  # (C, 2) control points at t = 0
    ou_um: np.ndarray  # (C, 2) their current Ornstein-Uhlenbeck displacement
    diameter_nm: float
    z_nm: float
    length_um: float = 0.0
    fission: tuple[float, float, float, float] | None = None  # s_fraction, onset_s, division_s, end_s
    gap_nm: float = 0.0
    event_id: int = -1


@dataclass
class WorldParams:
    """One held-out microscope and sample, drawn from WORLD."""

    pixel_size_nm: float
    wavelength_nm: float
    na: float
    interval_s: float
    constriction_s: float
    division_s: float
    length_density_um_per_um2: float
    bleach_lost: float
    peak_photons: float
    background_photons: float
    haze_fraction: float
    haze_sigma_um: float
    vignetting: float
    tilt: tuple[float, float]
    motion_rms_nm: float
    motion_tau_s: float
    drift_nm_per_s: tuple[float, float]
    emccd: bool
    active_events_per_um: float


def draw_params(rng: np.random.Generator, events: bool = True) -> WorldParams:
    w = WORLD

    def log_u(b: tuple[float, float]) -> float:
        return float(np.exp(rng.uniform(*np.log(b))))

    return WorldParams(
        pixel_size_nm=rng.uniform(*w["pixel_size_nm"]), wavelength_nm=rng.uniform(*w["wavelength_nm"]),
        na=rng.uniform(*w["na"]), interval_s=rng.uniform(*w["interval_s"]),
        constriction_s=rng.uniform(*w["constriction_s"]), division_s=rng.uniform(*w["division_s"]),
        length_density_um_per_um2=rng.uniform(*w["length_density_um_per_um2"]),
        bleach_lost=rng.uniform(*w["bleach_lost"]), peak_photons=log_u(w["peak_photons"]),
        background_photons=log_u(w["background_photons"]), haze_fraction=rng.uniform(*w["haze_fraction"]),
        haze_sigma_um=rng.uniform(*w["haze_sigma_um"]), vignetting=rng.uniform(*w["vignetting"]),
        tilt=tuple(rng.uniform(-1, 1, 2) * rng.uniform(*w["tilt"])),
        motion_rms_nm=rng.uniform(*w["motion_rms_nm"]), motion_tau_s=rng.uniform(*w["motion_tau_s"]),
        drift_nm_per_s=tuple(rng.uniform(*w["drift_nm_per_s"], 2)), emccd=bool(rng.random() < w["emccd_fraction"]),
        active_events_per_um=rng.uniform(*w["active_events_per_um"]) if events else 0.0)


def airy_psf(pixel_nm: float, wavelength_nm: float, na: float, radius_px: int | None = None) -> np.ndarray:
    """The in-focus scalar Airy PSF [2 J1(v)/v]^2, v = 2 pi NA r / wavelength, sampled
    at pixel centres of `pixel_nm` (a (2R+1)² kernel summing to 1). Its FWHM is
    0.514 wavelength / NA."""
    if radius_px is None:
        radius_px = int(np.ceil(2.5 * wavelength_nm / na / pixel_nm))
    r = np.hypot(*np.mgrid[-radius_px:radius_px + 1, -radius_px:radius_px + 1]) * pixel_nm
    v = 2 * np.pi * na * r / wavelength_nm
    with np.errstate(invalid="ignore", divide="ignore"):
        psf = np.where(v > 0, (2 * j1(v) / v) ** 2, 1.0)
    return psf / psf.sum()


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(np.ceil(radius_px)), 1)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    k = (np.hypot(xx, yy) <= max(radius_px, 0.5)).astype(float)
    return k / k.sum()


class HeldOutWorld:
    """One held-out sample and microscope; `frame()` gives the next frame and its active events."""

    def __init__(self, params: WorldParams, rng: np.random.Generator, field_px: int = WORLD["field_px"],
                 n_frames: int = 50, edge_tubules: bool = False) -> None:
        self.p, self.rng, self.field_px, self.n_frames = params, rng, field_px, n_frames
        self.field_um = field_px * params.pixel_size_nm / 1000
        self.t_s = 0.0
        self.frame_index = 0
        self.tubules: list[_Tubule] = []
        self._grow(edge_tubules)
        self._schedule_fissions()
        self._drift_um = np.zeros(2)
        shape = (field_px, field_px)
        yy, xx = (np.mgrid[:field_px, :field_px] + 0.5) / field_px - 0.5
        cos4 = np.cos(np.arctan(np.hypot(xx, yy) / np.hypot(0.5, 0.5))) ** 4  # 1 at the centre, 1/4 at a corner
        self.illumination = (1 - params.vignetting * (1 - cos4) / 0.75) * (1 + params.tilt[0] * xx + params.tilt[1] * yy)
        if params.emccd:
            self.em_gain, self.gain_map, self.offset_map = rng.uniform(100, 300), np.ones(shape), np.zeros(shape)
            self.read_map = np.full(shape, rng.uniform(20.0, 60.0))  # e- before division by the EM gain
        else:
            self.em_gain = 1.0
            self.gain_map = np.exp(rng.normal(0, rng.uniform(0.03, 0.1), shape))  # relative pixel gain
            self.offset_map = rng.normal(0, rng.uniform(0.5, 3.0), shape)  # e- of fixed pattern, around the mean
            self.read_map = np.exp(rng.normal(np.log(rng.uniform(1.0, 2.0)), 0.4, shape))  # e- rms, log-normal
        self.qe = rng.uniform(0.6, 0.95)
        self.bleach_rate_per_frame = -np.log1p(-params.bleach_lost) / max(n_frames, 1)
        self._psf_in_focus = airy_psf(params.pixel_size_nm / SUPERSAMPLE, params.wavelength_nm, params.na)
        self._scale: float | None = None

    # ---- sample -----------------------------------------------------------
    def _walk(self, start_um: np.ndarray, length_um: float) -> np.ndarray:
        n = max(int(np.ceil(length_um / STEP_UM)), 2) + 1
        heading = self.rng.uniform(0, 2 * np.pi)
        pts = [start_um]
        for _ in range(n - 1):
            heading += self.rng.normal(0, np.radians(40))
            pts.append(pts[-1] + STEP_UM * np.array([np.cos(heading), np.sin(heading)]))
        return np.array(pts)

    def _add(self, control: np.ndarray) -> None:
        w = WORLD
        self.tubules.append(_Tubule(control, np.zeros_like(control), self.rng.uniform(*w["tubule_diameter_nm"]),
                                    self.rng.uniform(-1, 1) * w["z_half_range_nm"],
                                    length_um=STEP_UM * (len(control) - 1)))

    def _grow(self, edge_tubules: bool) -> None:
        lo, hi = -MARGIN_UM, self.field_um + MARGIN_UM
        target_um = self.p.length_density_um_per_um2 * (hi - lo) ** 2
        total = 0.0
        if edge_tubules:  # one tubule across each edge, from 1.5 µm outside to 2.5 µm inside
            f = self.field_um
            for outside, inside in (((-1.5, 0.5), (2.5, 0.5)), ((f + 1.5, 0.5), (f - 2.5, 0.5)),
                                    ((0.5, -1.5), (0.5, 2.5)), ((0.5, f + 1.5), (0.5, f - 2.5))):
                along = self.rng.uniform(0.2, 0.8) * f  # where on the edge it crosses
                a, b = (np.array([c if c != 0.5 else along for c in end]) for end in (outside, inside))
                self._add(np.linspace(a, b, 5) + self.rng.normal(0, 0.1, (5, 2)))
                total += self.tubules[-1].length_um
        while total < target_um:
            length = self.rng.uniform(*WORLD["tubule_length_um"])
            if self.tubules and self.rng.random() < WORLD["branch_fraction"]:
                parent = self.tubules[self.rng.integers(len(self.tubules))]
                start = parent.control_um[self.rng.integers(len(parent.control_um))]
            else:
                start = self.rng.uniform(lo, hi, 2)
            self._add(self._walk(start, length))
            total += self.tubules[-1].length_um

    def _schedule_fissions(self) -> None:
        """Each tubule at least 1.5 µm long and within FISSION_MAX_Z_NM of focus may divide once:
        onsets uniform over the run, at the rate that keeps active_events_per_um of such
        tubule in progress on average."""
        p = self.p
        duration_s = p.constriction_s + p.division_s
        run_s = self.n_frames * p.interval_s
        next_id = 0
        for tb in self.tubules:
            if tb.length_um < 1.5 or abs(tb.z_nm) >= FISSION_MAX_Z_NM:
                continue
            expected = p.active_events_per_um * tb.length_um * run_s / duration_s
            if self.rng.random() < min(expected, 1.0):
                onset = self.rng.uniform(-duration_s / 2, run_s)
                tb.fission = (self.rng.uniform(0.25, 0.75), onset, onset + p.constriction_s, onset + duration_s)
                tb.gap_nm = self.rng.uniform(*_GAP_NM)
                tb.event_id = next_id
                next_id += 1

    def _points(self, tb: _Tubule, t_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(N, 2) centreline points (µm, 20 nm apart in arc), their diameters (nm) at t_s,
        and the neck position (µm) if an event is active."""
        ctrl = tb.control_um + tb.ou_um + self._drift_um
        k = min(3, len(ctrl) - 1)
        u = np.linspace(0, 1, len(ctrl))
        spline = make_interp_spline(u, ctrl, k=k)
        dense = spline(np.linspace(0, 1, 200))
        arc = np.concatenate([[0], np.cumsum(np.hypot(*np.diff(dense, axis=0).T))])
        n = max(int(arc[-1] / 0.02), 2)
        s = np.linspace(0, arc[-1], n)
        pts = np.column_stack([np.interp(s, arc, dense[:, 0]), np.interp(s, arc, dense[:, 1])])
        d = np.full(n, tb.diameter_nm)
        cap = tb.diameter_nm / 2000  # µm: hemispherical ends
        d *= np.sqrt(np.clip(1 - (np.maximum(cap - np.minimum(s, s[-1] - s), 0) / cap) ** 2, 0, 1))
        neck = None
        if tb.fission is not None:
            frac, onset, division, end = tb.fission
            s0 = frac * s[-1]
            if onset <= t_s < end:
                neck = np.array([np.interp(s0, s, pts[:, 0]), np.interp(s0, s, pts[:, 1])])
            if t_s >= onset:
                ease = 0.5 * (1 - np.cos(np.pi * min((t_s - onset) / (division - onset), 1.0)))
                d *= 1 - ease * np.exp(-((s - s0) ** 2) / (2 * 0.15**2))
            if t_s >= division:
                gap_um = tb.gap_nm / 1000 * min((t_s - division) / (end - division), 1.0) + 0.05
                dist = np.abs(s - s0) - gap_um / 2
                d = np.where(dist <= 0, 0.0, d * np.sqrt(np.clip(1 - (np.maximum(cap - dist, 0) / cap) ** 2, 0, 1)))
        return pts, d, neck

    def _advance(self, dt_s: float) -> None:
        p = self.p
        decay = np.exp(-dt_s / p.motion_tau_s)
        sd = p.motion_rms_nm / 1000 * np.sqrt(1 - decay**2)
        for tb in self.tubules:
            tb.ou_um = tb.ou_um * decay + self.rng.normal(0, sd, tb.ou_um.shape)
        self._drift_um = self._drift_um + np.array(p.drift_nm_per_s) / 1000 * dt_s

    # ---- image --------------------------------------------------------------
    def _deposit(self, pts_um: np.ndarray, diameter_nm: np.ndarray, size: int, pad: int) -> np.ndarray:
        """Projected-cylinder density of one tubule on the (size, size) supersampled grid: five
        lines across the tube, weighted by the chord length there, points 20 nm apart."""
        sub_nm = self.p.pixel_size_nm / SUPERSAMPLE
        grad = np.gradient(pts_um, axis=0)
        across = np.column_stack([-grad[:, 1], grad[:, 0]]) / np.maximum(np.hypot(*grad.T), 1e-9)[:, None]
        r_um = diameter_nm / 2000
        xs, ys, ws = [], [], []
        for u in (-0.8, -0.4, 0.0, 0.4, 0.8):
            q = pts_um + (u * r_um)[:, None] * across
            xs.append(q[:, 0])
            ys.append(q[:, 1])
            ws.append(np.sqrt(1 - u**2) * r_um**2)
        x = np.concatenate(xs) * 1000 / sub_nm + pad
        y = np.concatenate(ys) * 1000 / sub_nm + pad
        return np.histogram2d(y, x, bins=size, range=((0, size), (0, size)), weights=np.concatenate(ws))[0]

    def _blur_and_bin(self, layers: dict[int, np.ndarray], pad: int) -> np.ndarray:
        """Each defocus class through its PSF (Airy, convolved out of focus with a defocus disk of
        radius DEFOCUS_BLUR dz tan(asin(NA / 1.518))), cropped and binned to camera pixels."""
        p, n = self.p, self.field_px
        sub_nm = p.pixel_size_nm / SUPERSAMPLE
        img = 0.0
        for z_class, density in layers.items():
            kernel = self._psf_in_focus
            if z_class:
                radius = DEFOCUS_BLUR * 150.0 * z_class * np.tan(np.arcsin(min(p.na / 1.518, 0.99))) / sub_nm
                kernel = fftconvolve(kernel, _disk(radius))
            img = img + fftconvolve(density, kernel, mode="same")
        img = img[pad:pad + n * SUPERSAMPLE, pad:pad + n * SUPERSAMPLE]
        return img.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).sum(axis=(1, 3))

    def _photons_per_density(self, pad: int) -> float:
        """The scale that makes a straight 300 nm tubule in focus peak at peak_photons per pixel."""
        if self._scale is None:
            mid = self.field_um / 2
            pts = np.column_stack([np.full(200, mid), np.linspace(mid - 2, mid + 2, 200)])
            size = self.field_px * SUPERSAMPLE + 2 * pad
            img = self._blur_and_bin({0: self._deposit(pts, np.full(200, 300.0), size, pad)}, pad)
            self._scale = self.p.peak_photons / float(img.max())
        return self._scale

    def expected_photons(self) -> tuple[np.ndarray, np.ndarray]:
        """The expected photons per pixel of the current time and the active events (K, 3) id, x_px, y_px."""
        p, n = self.p, self.field_px
        pad = self._psf_in_focus.shape[0]
        size = n * SUPERSAMPLE + 2 * pad
        layers: dict[int, np.ndarray] = {}  # defocus class (150 nm steps of |z|) -> supersampled density
        events = []
        for tb in self.tubules:
            pts, d, neck = self._points(tb, self.t_s)
            if neck is not None and 0 <= neck[0] < self.field_um and 0 <= neck[1] < self.field_um:
                events.append((tb.event_id, *(neck * 1000 / p.pixel_size_nm)))
            keep = d > 0
            if keep.sum() < 2:
                continue
            z_class = min(int(abs(tb.z_nm) // 150), 2)
            layers[z_class] = layers.get(z_class, 0) + self._deposit(pts[keep], d[keep], size, pad)
        img = self._blur_and_bin(layers, pad) * self._photons_per_density(pad)
        img *= np.exp(-self.bleach_rate_per_frame * self.frame_index)
        if p.haze_fraction > 0:
            img = img + p.haze_fraction * gaussian_filter(img, p.haze_sigma_um * 1000 / p.pixel_size_nm, mode="nearest")
        img = (img + p.background_photons) * self.illumination
        return img, np.array(events, float).reshape(-1, 3)

    def frame(self) -> tuple[np.ndarray, np.ndarray]:
        """The next noisy frame, photons estimated from the camera's mean gain and offset (float32),
        and its active events (K, 3) id, x_px, y_px; then time moves on by one interval."""
        expected, events = self.expected_photons()
        electrons = self.rng.poisson(np.maximum(expected * self.qe * self.gain_map, 0)).astype(np.float64)
        if self.em_gain > 1:
            electrons = self.rng.gamma(np.maximum(electrons, 1e-9), self.em_gain) * (electrons > 0) / self.em_gain
        electrons += self.read_map * self.rng.standard_normal(electrons.shape) / self.em_gain + self.offset_map
        adu = np.round(electrons / 0.5 + 100.0)  # 0.5 e-/ADU, 100 ADU baseline
        photons = ((adu - 100.0) * 0.5 / self.qe).astype(np.float32)
        self._advance(self.p.interval_s)
        self.t_s += self.p.interval_s
        self.frame_index += 1
        return photons, events


def independent_episode(rng: np.random.Generator, n_frames: int, events: bool = True,
                        edge_tubules: bool = False) -> tuple[np.ndarray, list[np.ndarray], float, WorldParams]:
    """(T, 128, 128) photons, per frame the active events (K, 3) id, x_px, y_px, the interval (ms),
    and the drawn parameters: one held-out episode."""
    params = draw_params(rng, events)
    world = HeldOutWorld(params, rng, n_frames=n_frames, edge_tubules=edge_tubules)
    frames, truth = zip(*(world.frame() for _ in range(n_frames)), strict=True)
    return np.stack(frames), list(truth), params.interval_s * 1000, params


def independent_episodes(seed: int, episodes: int, frames: int) -> list[tuple[np.ndarray, list[np.ndarray], float]]:
    """Held-out episodes (frames, events, interval ms), as `training.episodes.held_out_episodes` gives them."""
    rng = np.random.default_rng(seed)
    return [independent_episode(rng, frames)[:3] for _ in range(episodes)]


def edge_touching_field(seed: int, n_frames: int = 8) -> tuple[np.ndarray, float, float]:
    """A held-out field with no event whose tubules cross all four edges: (T, 128, 128) photons,
    the pixel size (nm) and the interval (ms). Any detection in it is false."""
    frames, events, interval_ms, params = independent_episode(np.random.default_rng(seed), n_frames, events=False,
                                                              edge_tubules=True)
    assert not any(len(e) for e in events)
    return frames, params.pixel_size_nm, interval_ms
