"""Held-out SMLM frames: emitters through a pupil-function PSF, not our Gaussian family.

The localizer was trained on pixel-integrated astigmatic Gaussians
(`optics.render_gaussian_psfs`). Here each emitter's image is computed from
a pupil (scalar Fourier optics with the aplanatic apodisation of a high-NA
objective, 1/sqrt(cos theta)): exact defocus phase, astigmatism and spherical
aberration as Zernike terms, the intensity |FFT(pupil)|² sampled 4x finer
than the camera pixel and summed over each pixel, the emitter's sub-pixel
position by the Fourier shift theorem. It has rings, a z-dependent shape
that is not a stretched Gaussian, and a wider core than the training PSF's
sigma0. The Cramér-Rao bound is computed for this PSF numerically (Fisher
information of the pixelated model, derivatives by central differences),
the same estimand as `optics.integrated_gaussian_crlb_nm`: x, y, photons
and background free, z known. With `vectorial`, the image is that of a
freely rotating dipole (the sum of the x, y and z dipoles' intensities, each
with both in-plane polarisations of the pupil field, Richards-Wolf factors):
another physics class than the scalar pupils the localizer trains on
(`simulation.pupil`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from smartscope.simulation.camera import photons_to_adu
from smartscope.simulation.config import CameraConfig

OVERSAMPLE = 4
PUPIL_GRID = 256  # FFT size: the pupil is sampled on it, the PSF comes back periodic over 256 sub-pixels


@dataclass(frozen=True)
class PupilPSF:
    """A pupil-function PSF; coefficients in radians (rms-free Zernike amplitudes)."""

    wavelength_nm: float = 680.0
    na: float = 1.35
    immersion_index: float = 1.406  # silicone oil
    pixel_size_nm: float = 100.0
    astigmatism_rad: float = 1.2  # Z(2,2) amplitude: rho^2 cos 2phi
    spherical_rad: float = 0.3  # Z(4,0) amplitude: 6 rho^4 - 6 rho^2 + 1
    window_px: int = 15
    vectorial: bool = False  # a freely rotating dipole's image instead of the scalar one

    @cached_property
    def _pupil(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pupil field amplitudes (components, grid, grid) whose images' intensities add up: one (scalar), or
        the x, y and z dipoles' Ex and Ey (vectorial; an isotropic sum, so no cross terms); the aberration
        phase, the axial wavenumber, and the frequencies (1/nm)."""
        dx = self.pixel_size_nm / OVERSAMPLE
        k = np.fft.fftfreq(PUPIL_GRID, d=dx)
        kx, ky = np.meshgrid(k, k)
        kr = np.hypot(kx, ky)
        cutoff = self.na / self.wavelength_nm
        rho = kr / cutoff
        inside = rho <= 1
        sin_t = np.clip(kr * self.wavelength_nm / self.immersion_index, 0, 0.999)
        cos_t = np.sqrt(1 - sin_t**2)
        amplitude = np.where(inside, 1 / np.sqrt(cos_t), 0.0)
        phi = np.arctan2(ky, kx)
        if self.vectorial:
            c, s = np.cos(phi), np.sin(phi)
            amplitude = amplitude * np.stack([c**2 * cos_t + s**2, c * s * (cos_t - 1),  # x dipole: Ex, Ey
                                              c * s * (cos_t - 1), s**2 * cos_t + c**2,  # y dipole
                                              -sin_t * c, -sin_t * s])  # z dipole
        else:
            amplitude = amplitude[None]
        aberration = self.astigmatism_rad * rho**2 * np.cos(2 * phi) + self.spherical_rad * (6 * rho**4 - 6 * rho**2 + 1)
        kz = 2 * np.pi * np.sqrt(np.maximum((self.immersion_index / self.wavelength_nm) ** 2 - kr**2, 0))
        return amplitude, np.where(inside, aberration, 0.0), kz, np.stack([kx, ky])

    def image(self, dx_px: float, dy_px: float, z_nm: float) -> np.ndarray:
        """(window, window) pixel-integrated PSF summing to the light that falls in the window,
        the emitter dx_px, dy_px from the centre of the central pixel, z_nm from focus."""
        amplitude, aberration, kz, (kx, ky) = self._pupil
        # the samples of a pixel sit at its centre +-0.125, +-0.375 px: half a sample off the grid's origin
        off = 0.5 / OVERSAMPLE
        shift = 2 * np.pi * (kx * (dx_px - off) + ky * (dy_px - off)) * self.pixel_size_nm
        fields = np.fft.ifft2(amplitude * np.exp(1j * (aberration + kz * z_nm - shift)))
        intensity = np.fft.fftshift(np.sum(np.abs(fields) ** 2, axis=0))
        intensity /= intensity.sum()
        c = PUPIL_GRID // 2
        # the central camera pixel: sub-pixels c - 2 .. c + 1
        lo = c - (self.window_px // 2) * OVERSAMPLE - OVERSAMPLE // 2
        crop = intensity[lo:lo + self.window_px * OVERSAMPLE, lo:lo + self.window_px * OVERSAMPLE]
        return crop.reshape(self.window_px, OVERSAMPLE, self.window_px, OVERSAMPLE).sum(axis=(1, 3))

    def crlb_x_nm(self, photons: float, background_per_px: float, z_nm: float = 0.0, positions: int = 8,
                  seed: int = 0, read_noise_e: float = 0.0) -> float:
        """sqrt of the CRLB of x (nm), averaged (in variance) over random sub-pixel positions:
        Poisson noise on mu = photons * psf + background (detected counts), plus a read noise's
        variance (Huang et al. 2013, as `optics.integrated_gaussian_crlb_nm`); x, y, photons
        and background free. Derivatives of the PSF by central differences of 0.01 px."""
        rng = np.random.default_rng(seed)
        h = 0.01
        variances = []
        for dx, dy in rng.uniform(-0.5, 0.5, (positions, 2)):
            psf = self.image(dx, dy, z_nm)
            d_x = (self.image(dx + h, dy, z_nm) - self.image(dx - h, dy, z_nm)) / (2 * h)
            d_y = (self.image(dx, dy + h, z_nm) - self.image(dx, dy - h, z_nm)) / (2 * h)
            mu = photons * psf + background_per_px
            grads = np.stack([photons * d_x, photons * d_y, psf, np.ones_like(psf)]).reshape(4, -1)
            fisher = (grads / (mu.ravel() + read_noise_e**2)) @ grads.T
            variances.append(np.linalg.inv(fisher)[0, 0])
        return float(np.sqrt(np.mean(variances)) * self.pixel_size_nm)


def render_frames(psf: PupilPSF, emitters: list[np.ndarray], tile_px: int, background: float, camera: CameraConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """(n, tile, tile) uint16 ADU frames: each list entry (K, 4) x_nm, y_nm, z_nm, photons, in the
    pixel convention x_px = x_nm / pixel_size_nm (pixel k covers [k, k+1)), over a flat background."""
    px, w = psf.pixel_size_nm, psf.window_px
    half = w // 2
    out = np.empty((len(emitters), tile_px, tile_px), np.uint16)
    for i, em in enumerate(emitters):
        canvas = np.full((tile_px + 2 * w, tile_px + 2 * w), float(background))
        for x_nm, y_nm, z_nm, photons in em:
            ix, iy = int(np.floor(x_nm / px)), int(np.floor(y_nm / px))
            patch = photons * psf.image(x_nm / px - ix - 0.5, y_nm / px - iy - 0.5, z_nm)
            canvas[iy - half + w: iy + half + 1 + w, ix - half + w: ix + half + 1 + w] += patch
        out[i] = photons_to_adu(canvas[w:w + tile_px, w:w + tile_px], camera, rng)
    return out


def render_windows(psf: PupilPSF, emitters: list[np.ndarray], frames: int, tile_px: int, background: float,
                   camera: CameraConfig, rng: np.random.Generator, p_stay_on: float = 0.5) -> np.ndarray:
    """(n, frames, tile, tile) uint16 ADU windows whose LAST frame holds `emitters` (as
    `render_frames`); earlier frames blink back in time: each of the next frame's
    emitters was on with probability p_stay_on (for 30-100 % of the frame), and as
    many others elsewhere in the tile, so a model that reads a window sees one."""
    out = np.empty((len(emitters), frames, tile_px, tile_px), np.uint16)
    side_nm = tile_px * psf.pixel_size_nm
    for i, em in enumerate(emitters):
        lit = [em]
        for _ in range(frames - 1):
            stayed = lit[-1][rng.random(len(lit[-1])) < p_stay_on].copy()
            stayed[:, 3] *= rng.uniform(0.3, 1.0, len(stayed))
            others = em[rng.integers(0, len(em), rng.poisson(len(em) * (1 - p_stay_on)))].copy() if len(em) else em
            others[:, :2] = rng.uniform(0, side_nm, (len(others), 2))
            lit.append(np.concatenate([stayed, others]))
        out[i] = render_frames(psf, lit[::-1], tile_px, background, camera, rng)
    return out


def render_bead_stack(psf: PupilPSF, z_nm: np.ndarray, camera: CameraConfig, rng: np.random.Generator, *,
                      tile_px: int = 160, spacing_px: float = 18.0, photons: float = 1e5,
                      background: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """A bead z-stack as a lab images one to calibrate its PSF: (nz, tile, tile) uint16 ADU, the focus
    at each z_nm, beads on a jittered lattice (bright, fixed, each at its own sub-pixel position);
    and the beads' (K, 2) x, y in nm."""
    grid = np.arange(spacing_px / 2 + 1, tile_px - spacing_px / 2, spacing_px)
    gx, gy = np.meshgrid(grid, grid)
    xy_nm = (np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-2, 2, (gx.size, 2))) * psf.pixel_size_nm
    frames = [render_frames(psf, [np.column_stack([xy_nm, np.full(len(xy_nm), z), np.full(len(xy_nm), photons)])],
                            tile_px, background, camera, rng)[0] for z in z_nm]
    return np.stack(frames), xy_nm
