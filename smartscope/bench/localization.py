"""Localization, side by side: our network vs smappy-smlm (SMAP's MLE) vs trackpy.

All three see the same simulated frames (our optics and camera, exact ground
truth): windows of 3 frames whose emitters blink; the peers fit the last frame,
our network sees the window (and, as "smartscope-1frame", the last frame
alone). Each method's detection threshold is tuned on a separate tuning set
(best Jaccard), then judged on fresh frames with the SMLM-challenge protocol
(greedy nearest-first matching within 250 nm). Isolated emitters give the
RMSE against the Cramér–Rao bound; dense frames give the Jaccard index.

Peers are optional (`pip install smappy-smlm trackpy`); a missing one is
reported as such, not silently skipped.

`world="independent"` (`smartscope bench localization --world independent`)
also scores every method, at the settings tuned above, on frames of another
PSF model (`simulation.heldout_smlm.PupilPSF`: a pupil-function PSF with
rings, astigmatism and spherical aberration, not our Gaussian family), with
the Cramér-Rao bound computed for that PSF (numerical Fisher information):
RMSE / sqrt(CRLB) of isolated emitters per photon level and the Jaccard
index at 2 /µm², beside the figures above; and the Jaccard index at 2 /µm² on
OTHER_PUPILS, PSFs outside the pupil family our network trains on
(`simulation.pupil`), whose physics class (scalar pupils) the default
held-out PSF shares: two outside its ranges, and a vectorial one.

The bounds include the camera's read noise (and its ADU rounding, e_per_adu²/12),
as the simulated sCMOS has them (Huang et al. 2013); the Poisson-only bound is
in the JSON beside it. Our refinement fits the card's astigmatic Gaussian
(z from the network); "smartscope-beads" fits instead a PSF calibrated from a
simulated bead z-stack of the world's own PSF (`inference/psf.py`: 25 nm
steps, 1e5 photons per bead, never the test frames), x, y, photons,
background and z free, where the bounds hold z known.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from smartscope.evaluation import score
from smartscope.inference.localization import localize_frame
from smartscope.inference.session import load_model
from smartscope.resources import resolve_model_path
from smartscope.simulation import (
    CameraConfig,
    OpticsConfig,
    adu_to_photons,
    astigmatic_sigmas_nm,
    integrated_gaussian_crlb_nm,
    photons_to_adu,
    render_gaussian_psfs,
)
from smartscope.simulation.tiles import dense_emitters, simulate_windows

PIXEL_NM = 100.0
#: held-out PSFs outside the training family (scalar pupils, NA 1.1, oil, 640-700 nm, astigmatism 1.1-1.5 rad,
#: residual aberrations within ±0.35 rad): two scalar ones outside its ranges and a vectorial one (another
#: physics class); their Jaccard at 2 /µm², each on its own 60 tiles
OTHER_PUPILS = {
    "oil, NA 1.49, 600 nm, astigmatism 0.9 rad, spherical -0.6 rad":
        {"na": 1.49, "immersion_index": 1.518, "wavelength_nm": 600.0, "astigmatism_rad": 0.9, "spherical_rad": -0.6},
    "water, NA 1.2, 720 nm, astigmatism 1.8 rad, spherical 0.6 rad":
        {"na": 1.2, "immersion_index": 1.333, "wavelength_nm": 720.0, "astigmatism_rad": 1.8, "spherical_rad": 0.6},
    "vectorial (a freely rotating dipole), the held-out PSF's parameters": {"vectorial": True},
}
FAST_MODEL = "localization-w8.onnx"
FRAMES = 3
# (windows (n, T, H, W) ADU, settings) → per window, the last frame's localizations (N, 3) nm
Method = Callable[[np.ndarray, dict], list[np.ndarray]]


def ours_method(camera: CameraConfig, model_name: str = "localization.onnx", one_frame: bool = False,
                ) -> tuple[Method, list[dict]]:
    """Our pipeline (network + refinement, the camera's calibration) as a bench method, and its settings grid."""
    model = load_model(model_name, "cpu")

    def run(windows: np.ndarray, settings: dict) -> list[np.ndarray]:
        # the camera's own calibration (read noise included: the refinement's likelihood uses it)
        return [localize_frame(model, w[-1:] if one_frame else w, camera, **settings)[0][:, :3] for w in windows]

    return run, [{"threshold": t} for t in (0.3, 0.4, 0.5, 0.6, 0.7)]


def _smappy(camera: CameraConfig, sigma_px: float) -> tuple[Method, list[dict]]:
    import smappy

    meta = smappy.CameraMetadata(conversion=camera.e_per_adu, offset=camera.offset_adu,
                                 pixelsize_um=PIXEL_NM / 1000, em_on=False)

    def run(windows: np.ndarray, settings: dict) -> list[np.ndarray]:
        frames = np.ascontiguousarray(windows[:, -1])
        locs = smappy.fit(frames, camera=meta, cutoff_mode="absolute", **settings)
        if len(locs) == 0:
            return [np.zeros((0, 3)) for _ in frames]
        frame = np.asarray(locs["frame"], int)
        # smappy puts pixel centres at integer × pixel size; ours at (k + 0.5) × pixel size
        xyz = np.column_stack([np.asarray(locs["x_nm"]) + PIXEL_NM / 2, np.asarray(locs["y_nm"]) + PIXEL_NM / 2,
                               np.zeros(len(frame))])
        first = frame.min() if len(frame) else 0
        return [xyz[frame - first == i] for i in range(len(frames))]

    # its defaults (13 px ROI) are made for sparse data: tune ROI, cutoff and PSF width
    return run, [{"roisize": r, "cutoff": c, "sigma": sg} for r in (7, 9, 13) for c in (1.0, 2.0, 5.0, 10.0)
                 for sg in (0.8 * sigma_px, sigma_px)]


def _trackpy(camera: CameraConfig) -> tuple[Method, list[dict]]:
    import logging

    import trackpy

    trackpy.quiet()
    logging.getLogger("trackpy").setLevel(logging.ERROR)

    def run(windows: np.ndarray, settings: dict) -> list[np.ndarray]:
        out = []
        for f in windows[:, -1]:
            df = trackpy.locate(adu_to_photons(f, camera), separation=3, **settings)
            out.append(np.column_stack([(df["x"].to_numpy() + 0.5) * PIXEL_NM,
                                        (df["y"].to_numpy() + 0.5) * PIXEL_NM, np.zeros(len(df))]))
        return out

    return run, [{"diameter": d, "minmass": m} for d in (5, 7) for m in (100.0, 200.0, 400.0, 800.0, 1600.0)]


def dense_set(seed: int, n: int, density_per_um2: float, optics, camera):
    """`n` 64² windows of emitters at `density_per_um2` (background 20 photons/px) and their truth."""
    rng = np.random.default_rng(seed)
    tile = 64
    emitters = dense_emitters(rng, n, tile, PIXEL_NM, density_per_um2, z_half_range_nm=400.0)
    windows, truth, _ = simulate_windows(rng, n, FRAMES, tile, optics, camera, emitters=emitters,
                                         background=np.full(n, 20.0), as_adu=True)
    return windows, truth


def pixel_noise_e(camera: CameraConfig) -> float:
    """The camera's per-pixel noise beside shot noise: read noise and ADU rounding, rms electrons."""
    return float(np.hypot(camera.read_noise_e, camera.e_per_adu / np.sqrt(12)))


def _bead_calibration(world: str, camera: CameraConfig, folder: Path) -> tuple[str, dict]:
    """A PSF calibration of the world's PSF from a simulated bead z-stack (what a lab would image):
    the .npz path and how it was made."""
    from smartscope.inference.psf import calibrate_beads
    from smartscope.simulation.heldout_smlm import PupilPSF, render_bead_stack

    rng = np.random.default_rng(4242)
    z_nm = np.arange(-600.0, 601.0, 25.0)
    if world == "independent":
        stack, _ = render_bead_stack(PupilPSF(pixel_size_nm=PIXEL_NM), z_nm, camera, rng)
    else:
        stack = _gaussian_bead_stack(z_nm, camera, rng)
    psf = calibrate_beads(adu_to_photons(stack, camera), z_nm, PIXEL_NM)
    path = folder / f"psf-{world}.npz"
    psf.save(path)
    return str(path), {"beads": psf.beads, "z_step_nm": 25.0, "z_range_nm": [-600.0, 600.0],
                       "photons_per_bead": 1e5, "background_photons": 10.0}


def _gaussian_bead_stack(z_nm: np.ndarray, camera: CameraConfig, rng: np.random.Generator,
                         tile_px: int = 160, spacing_px: float = 18.0) -> np.ndarray:
    """As heldout_smlm.render_bead_stack, through our simulator's astigmatic PSF."""
    optics = OpticsConfig()
    grid = np.arange(spacing_px / 2 + 1, tile_px - spacing_px / 2, spacing_px)
    gx, gy = np.meshgrid(grid, grid)
    x, y = gx.ravel() + rng.uniform(-2, 2, gx.size), gy.ravel() + rng.uniform(-2, 2, gx.size)
    frames = []
    for z in z_nm:
        sx, sy = astigmatic_sigmas_nm(np.full(x.size, z), optics)
        img = render_gaussian_psfs((tile_px, tile_px), x, y, 1e5, sx / PIXEL_NM, sy / PIXEL_NM,
                                   out=np.full((tile_px, tile_px), 10.0))
        frames.append(photons_to_adu(img, camera, rng))
    return np.stack(frames)


ISOLATED_HEADER = (f"\n{'photons':>8} {'method':<17} {'RMSE x nm':>10} {'√CRLB nm':>9} {'ratio':>6} "
                   f"{'recall':>7} {'prec':>6}")


def _runs(methods: dict, best: dict, psf_calibration: str | None) -> dict[str, tuple[Method, dict]]:
    """Every method at its tuned settings, and, given a calibration, ours with the bead-calibrated PSF."""
    runs = {name: (method, best[name]) for name, (method, _) in methods.items()}
    if psf_calibration is not None:
        runs["smartscope-beads"] = (methods["smartscope"][0],
                                    best["smartscope"] | {"psf_calibration": psf_calibration})
    return runs


def _isolated_entries(methods: dict, best: dict, emitters: list[np.ndarray], frames: np.ndarray, crlb: float,
                      psf_calibration: str | None) -> dict:
    """RMSE x / √CRLB, recall and precision of every method (and, given a calibration, of ours with the
    bead-calibrated PSF) on isolated frames: precision counts what a real PSF's rings draw beside a bright
    emitter."""
    out = {}
    for name, (method, settings) in _runs(methods, best, psf_calibration).items():
        s = score([e[:, :3] for e in emitters], method(frames, settings))
        out[name] = {"rmse_x_nm": s["rmse_x_nm"], "rmse_over_crlb": round(s["rmse_x_nm"] / crlb, 3),
                     "recall": s["recall"], "precision": s["precision"]}
        print(f"{emitters[0][0, 3]:>8.0f} {name:<17} {s['rmse_x_nm']:>10.2f} {crlb:>9.2f} "
              f"{out[name]['rmse_over_crlb']:>6.2f} {s['recall']:>7.3f} {s['precision']:>6.3f}")
    return out


def _dense_scores(runs: dict[str, tuple[Method, dict]], emitters: list[np.ndarray], frames: np.ndarray,
                  first_column: str) -> dict[str, dict]:
    """Each run's detection scores on dense frames of a held-out PSF, a printed row each."""
    out = {}
    for name, (method, settings) in runs.items():
        s = out[name] = score([e[:, :3] for e in emitters], method(frames, settings))
        print(f"{first_column:>12} {name:<17} {s['jaccard']:>6.3f} {s['recall']:>7.3f} {s['precision']:>6.3f} "
              f"{s['rmse_lateral_nm']:>8.1f}")
    return out


def _timed(method: Method, frames: np.ndarray, param: dict) -> tuple[list[np.ndarray], float]:
    t0 = time.perf_counter()
    pred = method(frames, param)
    return pred, time.perf_counter() - t0


def independent_world(methods: dict[str, tuple[Method, list[dict]]], best: dict[str, dict], camera: CameraConfig,
                      n_dense: int, n_iso: int, folder: Path | None = None, other_pupils: bool = True) -> dict:
    """Every method at its tuned settings on held-out frames of a pupil-function PSF; with a `folder` for the
    bead stack's calibration, ours with that calibrated PSF too (dense and isolated emitters); with
    `other_pupils`, the Jaccard on OTHER_PUPILS as well."""
    from smartscope.simulation.heldout_smlm import PupilPSF, render_windows

    psf = PupilPSF(pixel_size_nm=PIXEL_NM)
    out: dict = {"psf": {k: getattr(psf, k) for k in ("wavelength_nm", "na", "immersion_index", "astigmatism_rad",
                                                      "spherical_rad")}, "dense": {}, "isolated": {}}
    calibration = None
    if folder is not None:
        calibration, out["psf_calibration"] = _bead_calibration("independent", camera, folder)
    print(f"\nheld-out PSF (pupil function, {psf.wavelength_nm:g} nm, NA {psf.na:g}, astigmatism "
          f"{psf.astigmatism_rad:g} rad, spherical {psf.spherical_rad:g} rad), settings as tuned above")
    rng = np.random.default_rng(2028)
    emitters = dense_emitters(rng, n_dense, 64, PIXEL_NM, 2.0, z_half_range_nm=400.0)
    frames = render_windows(psf, emitters, FRAMES, 64, 20.0, camera, rng)
    print(f"{'density /µm²':>12} {'method':<17} {'JI':>6} {'recall':>7} {'prec':>6} {'RMSE nm':>8}")
    out["dense"] = _dense_scores(_runs(methods, best, calibration), emitters, frames, "2.0")
    out["other_pupils"] = {}
    for k, (label, params) in enumerate(OTHER_PUPILS.items() if other_pupils else ()):
        print(f"\n{label} (outside the training family), 2 /µm²")
        other_rng = np.random.default_rng(2029 + k)
        emitters = dense_emitters(other_rng, n_dense, 64, PIXEL_NM, 2.0, z_half_range_nm=400.0)
        frames = render_windows(PupilPSF(pixel_size_nm=PIXEL_NM, **params), emitters, FRAMES, 64, 20.0, camera,
                                other_rng)
        out["other_pupils"][label] = _dense_scores(_runs(methods, best, None), emitters, frames, "")
    print(ISOLATED_HEADER)
    for photons in (500, 1000, 2000, 5000):
        emitters = [np.array([[rng.uniform(1500, 1700), rng.uniform(1500, 1700), 0.0, photons]]) for _ in range(n_iso)]
        frames = render_windows(psf, emitters, FRAMES, 32, 10.0, camera, rng)
        crlb = psf.crlb_x_nm(photons * camera.qe, 10.0 * camera.qe, read_noise_e=pixel_noise_e(camera))
        out["isolated"][str(photons)] = {
            "crlb_x_nm": round(crlb, 2),
            "crlb_x_nm_poisson_only": round(psf.crlb_x_nm(photons * camera.qe, 10.0 * camera.qe), 2),
            **_isolated_entries(methods, best, emitters, frames, crlb, calibration)}
    return out


def run(quick: bool = False, world: str = "simulator") -> dict:
    if world not in ("simulator", "independent"):
        raise ValueError(f"unknown world {world!r}; one of simulator, independent")
    optics, camera = OpticsConfig(), CameraConfig()
    sigma0_nm = float(astigmatic_sigmas_nm(np.zeros(1), optics)[0][0])
    methods: dict[str, tuple[Method, list[dict]]] = {"smartscope": ours_method(camera),
                                                     "smartscope-1frame": ours_method(camera, one_frame=True)}
    if resolve_model_path(FAST_MODEL).is_file():  # the narrow variant, for large fields at high rates
        methods["smartscope-w8"] = ours_method(camera, FAST_MODEL)
    missing = {}
    for name, factory in (("smappy", lambda: _smappy(camera, sigma0_nm / PIXEL_NM)),
                          ("trackpy", lambda: _trackpy(camera))):
        try:
            methods[name] = factory()
        except ImportError as e:
            missing[name] = f"not installed ({e.name}); pip install smappy-smlm trackpy"
    n_dense, n_iso = (15, 40) if quick else (60, 1000)  # RMSE of 1000 fits: ±2 % (1 s.e.)

    # 1. tune each method's settings on its own tuning frames (best Jaccard)
    tune_frames, tune_truth = dense_set(1, n_dense, 1.0, optics, camera)
    best: dict[str, dict] = {}
    for name, (method, grid) in methods.items():
        jis = [score([t[:, :3] for t in tune_truth], method(tune_frames, p))["jaccard"] for p in grid]
        best[name] = grid[int(np.argmax(jis))]
        print(f"tuned {name:<10} {best[name]}  (Jaccard {max(jis):.3f}; {len(grid)} settings tried)")

    results: dict = {"tuned_thresholds": best, "missing_peers": missing, "dense": {}, "isolated": {}}
    # 2. dense frames: detection quality
    print(f"\n{'density /µm²':>12} {'method':<17} {'JI':>6} {'recall':>7} {'prec':>6} {'RMSE nm':>8} {'locs/s':>8}")
    for density in (0.5, 1.0, 2.0):
        frames, truth = dense_set(100 + int(density * 10), n_dense, density, optics, camera)
        results["dense"][str(density)] = {}
        for name, (method, _) in methods.items():
            pred, seconds = _timed(method, frames, best[name])
            s = score([t[:, :3] for t in truth], pred)
            s["localizations_per_s"] = round(sum(len(p) for p in pred) / seconds, 1)
            results["dense"][str(density)][name] = s
            print(f"{density:>12} {name:<17} {s['jaccard']:>6.3f} {s['recall']:>7.3f} {s['precision']:>6.3f} "
                  f"{s['rmse_lateral_nm']:>8.1f} {s['localizations_per_s']:>8.0f}")
    ours_ji = results["dense"]["2.0"]["smartscope"]["jaccard"]
    for name in methods:
        if not name.startswith("smartscope"):
            peer = results["dense"]["2.0"][name]["jaccard"]
            results["dense"]["2.0"][f"ji_ratio_vs_{name}"] = round(ours_ji / peer, 3) if peer else None

    # 3. isolated emitters: precision against the Cramér–Rao bound (shot and read noise)
    folder = Path(tempfile.mkdtemp(prefix="smartscope-psf-"))
    calibration, results["psf_calibration"] = _bead_calibration("simulator", camera, folder)
    print(ISOLATED_HEADER)
    rng = np.random.default_rng(7)
    for photons in (500, 1000, 2000, 5000):
        emitters = [np.array([[rng.uniform(1500, 1700), rng.uniform(1500, 1700), 0.0, photons]]) for _ in range(n_iso)]
        frames, truth, _ = simulate_windows(rng, n_iso, FRAMES, 32, optics, camera, emitters=emitters,
                                            background=np.full(n_iso, 10.0), as_adu=True)
        crlb = float(integrated_gaussian_crlb_nm(photons * camera.qe, 10.0 * camera.qe, sigma0_nm, PIXEL_NM,
                                                 read_noise_e=pixel_noise_e(camera)))
        results["isolated"][str(photons)] = {
            "crlb_x_nm": round(crlb, 2),
            "crlb_x_nm_poisson_only": round(float(integrated_gaussian_crlb_nm(
                photons * camera.qe, 10.0 * camera.qe, sigma0_nm, PIXEL_NM)), 2),
            **_isolated_entries(methods, best, truth, frames, crlb, calibration)}
    if world == "independent":
        results["independent"] = independent_world(methods, best, camera, n_dense, n_iso, folder)
    shutil.rmtree(folder, ignore_errors=True)
    for name, why in missing.items():
        print(f"peer {name}: {why}")
    return results
