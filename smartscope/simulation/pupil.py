"""Pupil-function PSFs anchored to the card's astigmatic calibration: rings and side lobes for training.

The localizer's tiles draw emitters through the card's astigmatic Gaussian
(`optics.astigmatic_sigmas_nm`). A real astigmatic PSF has the same widths
against z, near enough, but also what no Gaussian has: rings around the
core and side lobes beside each focal line, which a network trained on
Gaussians takes for dim emitters. A `PupilFamily` is a bank of scalar
pupil-function PSFs (aplanatic apodisation, exact defocus phase) whose
effective NA, astigmatism and extra blur were fitted once so that their
Gaussian-fit widths follow the card's curves (`ANCHOR`, `fit_anchor`); each
member varies those by a little and adds small random residual aberrations.
The training tiles render a share of their emitters through it
(`tiles.simulate_windows`).

Tables are point samples TABLE_SAMPLE_NM apart, so an emitter rendered
through one sits on that grid (`snap_nm`): the tile's truth is the rendered
position, exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.optimize import curve_fit

from smartscope.simulation.config import OpticsConfig
from smartscope.simulation.optics import astigmatic_sigmas_nm

FFT_SIZE = 512
FFT_SAMPLE_NM = 12.5  # the FFT's image sampling; tables keep every second sample
TABLE_SAMPLE_NM = 25.0  # 4 point samples per 100 nm pixel (midpoint rule)
TABLE_HALF = 34  # table: 2 * TABLE_HALF samples (17 pixels of 100 nm) centred on the emitter
Z_STEP_NM = 25.0
Z_RANGE_NM = 600.0  # the tiles' z range (tiles.TILE_DISTRIBUTION)
#: effective NA, Z(2,2) astigmatism (rad, peak) and extra Gaussian blur (nm) at which a pupil PSF at the
#: default OpticsConfig's wavelength and immersion has the card's Gaussian-fit widths over -600..600 nm:
#: fit_anchor(OpticsConfig()) (2.5 min; tests/test_pupil.py checks its error)
ANCHOR = {"na": 1.1, "astigmatism_rad": 1.3, "blur_nm": 60.0, "rms_width_error_nm": 10.3}
#: each member: residual aberrations (Zernike (n, m): peak rad, uniform ±), and the anchor scaled by U(lo, hi)
RESIDUAL_RAD = 0.35
RESIDUAL_TERMS = ((4, 0), (3, 1), (3, -1), (3, 3), (3, -3), (2, -2), (4, 2), (4, -2))
ANCHOR_SPREAD = {"astigmatism_rad": (0.85, 1.15), "blur_nm": (0.8, 1.2)}
WAVELENGTH_NM = (640.0, 700.0)


def zernike(n: int, m: int, rho: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """The few Zernike terms a family uses, unnormalised (peak 1 at the pupil's edge)."""
    angular = np.cos(m * theta) if m >= 0 else np.sin(-m * theta)
    radial = {(2, 2): rho**2, (3, 1): 3 * rho**3 - 2 * rho, (3, 3): rho**3, (4, 0): 6 * rho**4 - 6 * rho**2 + 1,
              (4, 2): 4 * rho**4 - 3 * rho**2}[(n, abs(m))]
    return radial * (1.0 if (n, m) == (4, 0) else angular)


def psf_planes(z_nm: np.ndarray, optics: OpticsConfig, wavelength_nm: float, aberrations_rad: dict,
               blur_nm: float) -> np.ndarray:
    """(Z, 2·TABLE_HALF, 2·TABLE_HALF) intensity point samples TABLE_SAMPLE_NM apart, the emitter at
    sample TABLE_HALF, each plane normalised so that its samples × the sample area sum to the light
    that reaches the whole image (what lies beyond 17 pixels is lost, as on a camera)."""
    f = np.fft.fftfreq(FFT_SIZE, d=FFT_SAMPLE_NM)  # cycles / nm
    kx, ky = np.meshgrid(f, f)
    kr = np.hypot(kx, ky)
    n_over_lambda = optics.immersion_index / wavelength_nm
    rho = kr / (optics.na / wavelength_nm)
    inside = rho <= 1.0
    kz = np.sqrt(np.clip(n_over_lambda**2 - kr**2, 1e-12, None))  # axial wavenumber (cycles / nm)
    cos_theta = kz / n_over_lambda
    theta = np.arctan2(ky, kx)
    phase = sum(a * zernike(n, m, np.where(inside, rho, 0.0), theta) for (n, m), a in aberrations_rad.items())
    pupil = np.where(inside, np.exp(1j * phase) / np.sqrt(cos_theta), 0.0)
    c, h = FFT_SIZE // 2, 2 * TABLE_HALF
    out = np.empty((len(z_nm), h, h), np.float32)
    for i, z in enumerate(np.asarray(z_nm, float)):
        intensity = np.fft.fftshift(np.abs(np.fft.ifft2(pupil * np.exp(2j * np.pi * kz * z))) ** 2)
        if blur_nm > 0:
            intensity = gaussian_filter(intensity, blur_nm / FFT_SAMPLE_NM, mode="wrap")
        total = intensity.sum() * FFT_SAMPLE_NM**2
        out[i] = intensity[c - h: c + h: 2, c - h: c + h: 2] * TABLE_SAMPLE_NM**2 / total
    return out


def gaussian_widths_nm(plane: np.ndarray) -> tuple[float, float]:
    """sigma_x, sigma_y (nm) of an axis-aligned Gaussian fitted to a table plane (as a bead calibration fits)."""
    coords = (np.arange(plane.shape[0]) - TABLE_HALF) * TABLE_SAMPLE_NM
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    def model(_, a, sx, sy):
        return (a * np.exp(-xx**2 / (2 * sx**2) - yy**2 / (2 * sy**2))).ravel()

    (_, sx, sy), _ = curve_fit(model, None, plane.ravel(), p0=(plane.max(), 150.0, 150.0))
    return abs(float(sx)), abs(float(sy))


def anchor_error_nm(optics: OpticsConfig, na: float, astigmatism_rad: float, blur_nm: float,
                    z_nm: np.ndarray) -> float:
    """rms difference (nm) between the Gaussian-fit widths of that pupil PSF and the card's over `z_nm`."""
    sx_card, sy_card = astigmatic_sigmas_nm(z_nm, optics)
    planes = psf_planes(z_nm, optics.model_copy(update={"na": na}), optics.wavelength_nm,
                        {(2, 2): astigmatism_rad}, blur_nm)
    widths = np.array([gaussian_widths_nm(p) for p in planes])
    return float(np.sqrt(np.mean((widths[:, 0] - sx_card) ** 2 + (widths[:, 1] - sy_card) ** 2) / 2))


def fit_anchor(optics: OpticsConfig, z_nm: np.ndarray | None = None) -> dict:
    """The effective NA, Z(2,2) astigmatism and extra blur whose pupil PSF (at the card's wavelength and
    immersion) best follows the card's Gaussian widths (`astigmatic_sigmas_nm`) over `z_nm`: a grid search.
    The NA is free because the card's curves grow slower with z than an NA 1.45 pupil's do."""
    z = np.arange(-600.0, 601.0, 100.0) if z_nm is None else np.asarray(z_nm, float)
    grid = [(na, a, b) for na in np.arange(0.9, 1.46, 0.05) for a in np.arange(0.4, 2.01, 0.1)
            for b in (0.0, 30.0, 60.0)]
    errors = [anchor_error_nm(optics, *g, z) for g in grid]
    na, astig, blur = grid[int(np.argmin(errors))]
    return {"na": round(float(na), 2), "astigmatism_rad": round(float(astig), 2), "blur_nm": float(blur),
            "rms_width_error_nm": round(min(errors), 1)}


@dataclass
class PupilFamily:
    """A bank of `members` PSF tables (members, Z, samples, samples), planes Z_STEP_NM apart over ±Z_RANGE_NM."""

    tables: np.ndarray
    z_nm: np.ndarray

    @property
    def members(self) -> int:
        return len(self.tables)

    @classmethod
    def draw(cls, rng: np.random.Generator, members: int, optics: OpticsConfig | None = None) -> PupilFamily:
        optics = (optics or OpticsConfig()).model_copy(update={"na": ANCHOR["na"]})
        z = np.arange(-Z_RANGE_NM, Z_RANGE_NM + 1e-9, Z_STEP_NM)
        tables = []
        for _ in range(members):
            aberrations = {t: rng.uniform(-RESIDUAL_RAD, RESIDUAL_RAD) for t in RESIDUAL_TERMS}
            aberrations[(2, 2)] = ANCHOR["astigmatism_rad"] * rng.uniform(*ANCHOR_SPREAD["astigmatism_rad"])
            blur = ANCHOR["blur_nm"] * rng.uniform(*ANCHOR_SPREAD["blur_nm"])
            tables.append(psf_planes(z, optics, rng.uniform(*WAVELENGTH_NM), aberrations, blur))
        return cls(np.stack(tables), z)

    def snap_nm(self, emitters: np.ndarray) -> np.ndarray:
        """(K, ≥3) x, y, z nm → the same on the table's grid: x, y at sample centres, z on a plane."""
        out = emitters.copy()
        out[:, :2] = (np.floor(out[:, :2] / TABLE_SAMPLE_NM) + 0.5) * TABLE_SAMPLE_NM
        out[:, 2] = np.clip(np.round(out[:, 2] / Z_STEP_NM) * Z_STEP_NM, self.z_nm[0], self.z_nm[-1])
        return out

    def render(self, image: np.ndarray, member: int, emitters: np.ndarray, pixel_size_nm: float) -> None:
        """Add snapped emitters (K, 4: x, y, z nm, photons) to `image` (photons per pixel), in place."""
        per_px = int(round(pixel_size_nm / TABLE_SAMPLE_NM))
        if abs(per_px * TABLE_SAMPLE_NM - pixel_size_nm) > 1e-6:
            raise ValueError(f"pixel size {pixel_size_nm} nm is not a multiple of {TABLE_SAMPLE_NM} nm")
        h, w = image.shape
        n = 2 * TABLE_HALF
        padded = np.zeros((n + per_px, n + per_px), np.float32)
        for x, y, z, photons in emitters[:, :4]:
            plane = self.tables[member, int(round((z - self.z_nm[0]) / Z_STEP_NM))]
            start = np.floor(np.array([y, x]) / TABLE_SAMPLE_NM).astype(int) - TABLE_HALF  # first sample's index
            offset = start % per_px
            padded[:] = 0.0
            padded[offset[0]: offset[0] + n, offset[1]: offset[1] + n] = plane
            size = (n + per_px) // per_px
            pixels = padded[: size * per_px, : size * per_px].reshape(size, per_px, size, per_px).sum(axis=(1, 3))
            r0, c0 = (start - offset) // per_px
            rs, cs = slice(max(r0, 0), min(r0 + size, h)), slice(max(c0, 0), min(c0 + size, w))
            if rs.start < rs.stop and cs.start < cs.stop:
                image[rs, cs] += photons * pixels[rs.start - r0: rs.stop - r0, cs.start - c0: cs.stop - c0]
