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
index at 2 /µm², beside the figures above.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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
)
from smartscope.simulation.tiles import dense_emitters, simulate_windows
from smartscope.transport.protocol import CameraParams

PIXEL_NM = 100.0
FAST_MODEL = "localization-w8.onnx"
FRAMES = 3
# (windows (n, T, H, W) ADU, settings) → per window, the last frame's localizations (N, 3) nm
Method = Callable[[np.ndarray, dict], list[np.ndarray]]


def _ours(camera: CameraConfig, model_name: str = "localization.onnx", one_frame: bool = False,
          ) -> tuple[Method, list[dict]]:
    model = load_model(model_name, "cpu")
    params = CameraParams(pixel_size_nm=PIXEL_NM, offset_adu=camera.offset_adu, e_per_adu=camera.e_per_adu,
                          qe=camera.qe, em_gain=camera.em_gain)

    def run(windows: np.ndarray, settings: dict) -> list[np.ndarray]:
        return [localize_frame(model, w[-1:] if one_frame else w, params, **settings)[0][:, :3] for w in windows]

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


def _dense_set(seed: int, n: int, density_per_um2: float, optics, camera):
    rng = np.random.default_rng(seed)
    tile = 64
    emitters = dense_emitters(rng, n, tile, PIXEL_NM, density_per_um2, z_half_range_nm=400.0)
    windows, truth, _ = simulate_windows(rng, n, FRAMES, tile, optics, camera, emitters=emitters,
                                         background=np.full(n, 20.0), as_adu=True)
    return windows, truth


def _timed(method: Method, frames: np.ndarray, param: dict) -> tuple[list[np.ndarray], float]:
    t0 = time.perf_counter()
    pred = method(frames, param)
    return pred, time.perf_counter() - t0


def _independent(methods: dict[str, tuple[Method, list[dict]]], best: dict[str, dict], camera: CameraConfig,
                 n_dense: int, n_iso: int) -> dict:
    """Every method at its tuned settings on held-out frames of a pupil-function PSF."""
    from smartscope.simulation.heldout_smlm import PupilPSF, render_windows

    psf = PupilPSF(pixel_size_nm=PIXEL_NM)
    out: dict = {"psf": {k: getattr(psf, k) for k in ("wavelength_nm", "na", "immersion_index", "astigmatism_rad",
                                                      "spherical_rad")}, "dense": {}, "isolated": {}}
    print(f"\nheld-out PSF (pupil function, {psf.wavelength_nm:g} nm, NA {psf.na:g}, astigmatism "
          f"{psf.astigmatism_rad:g} rad, spherical {psf.spherical_rad:g} rad), settings as tuned above")
    rng = np.random.default_rng(2028)
    emitters = dense_emitters(rng, n_dense, 64, PIXEL_NM, 2.0, z_half_range_nm=400.0)
    frames = render_windows(psf, emitters, FRAMES, 64, 20.0, camera, rng)
    print(f"{'density /µm²':>12} {'method':<17} {'JI':>6} {'recall':>7} {'prec':>6} {'RMSE nm':>8}")
    for name, (method, _) in methods.items():
        s = score([e[:, :3] for e in emitters], method(frames, best[name]))
        out["dense"][name] = s
        print(f"{2.0:>12} {name:<17} {s['jaccard']:>6.3f} {s['recall']:>7.3f} {s['precision']:>6.3f} "
              f"{s['rmse_lateral_nm']:>8.1f}")
    print(f"\n{'photons':>8} {'method':<17} {'RMSE x nm':>10} {'√CRLB nm':>9} {'ratio':>6} {'recall':>7}")
    for photons in (500, 1000, 2000, 5000):
        emitters = [np.array([[rng.uniform(1500, 1700), rng.uniform(1500, 1700), 0.0, photons]]) for _ in range(n_iso)]
        frames = render_windows(psf, emitters, FRAMES, 32, 10.0, camera, rng)
        crlb = psf.crlb_x_nm(photons * camera.qe, 10.0 * camera.qe)
        out["isolated"][str(photons)] = {"crlb_x_nm": round(crlb, 2)}
        for name, (method, _) in methods.items():
            s = score([e[:, :3] for e in emitters], method(frames, best[name]))
            entry = {"rmse_x_nm": s["rmse_x_nm"], "rmse_over_crlb": round(s["rmse_x_nm"] / crlb, 3),
                     "recall": s["recall"]}
            out["isolated"][str(photons)][name] = entry
            print(f"{photons:>8} {name:<17} {entry['rmse_x_nm']:>10.2f} {crlb:>9.2f} {entry['rmse_over_crlb']:>6.2f} "
                  f"{entry['recall']:>7.3f}")
    return out


def run(quick: bool = False, world: str = "simulator") -> dict:
    if world not in ("simulator", "independent"):
        raise ValueError(f"unknown world {world!r}; one of simulator, independent")
    optics, camera = OpticsConfig(), CameraConfig()
    sigma0_nm = float(astigmatic_sigmas_nm(np.zeros(1), optics)[0][0])
    methods: dict[str, tuple[Method, list[dict]]] = {"smartscope": _ours(camera),
                                                     "smartscope-1frame": _ours(camera, one_frame=True)}
    if resolve_model_path(FAST_MODEL).is_file():  # the narrow variant, for large fields at high rates
        methods["smartscope-w8"] = _ours(camera, FAST_MODEL)
    missing = {}
    for name, factory in (("smappy", lambda: _smappy(camera, sigma0_nm / PIXEL_NM)), ("trackpy", lambda: _trackpy(camera))):
        try:
            methods[name] = factory()
        except ImportError as e:
            missing[name] = f"not installed ({e.name}); pip install smappy-smlm trackpy"
    n_dense, n_iso = (15, 40) if quick else (60, 1000)  # RMSE of 1000 fits: ±2 % (1 s.e.)

    # 1. tune each method's settings on its own tuning frames (best Jaccard)
    tune_frames, tune_truth = _dense_set(1, n_dense, 1.0, optics, camera)
    best: dict[str, dict] = {}
    for name, (method, grid) in methods.items():
        jis = [score([t[:, :3] for t in tune_truth], method(tune_frames, p))["jaccard"] for p in grid]
        best[name] = grid[int(np.argmax(jis))]
        print(f"tuned {name:<10} {best[name]}  (Jaccard {max(jis):.3f}; {len(grid)} settings tried)")

    results: dict = {"tuned_thresholds": best, "missing_peers": missing, "dense": {}, "isolated": {}}
    # 2. dense frames: detection quality
    print(f"\n{'density /µm²':>12} {'method':<17} {'JI':>6} {'recall':>7} {'prec':>6} {'RMSE nm':>8} {'locs/s':>8}")
    for density in (0.5, 1.0, 2.0):
        frames, truth = _dense_set(100 + int(density * 10), n_dense, density, optics, camera)
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

    # 3. isolated emitters: precision against the Cramér–Rao bound
    print(f"\n{'photons':>8} {'method':<17} {'RMSE x nm':>10} {'√CRLB nm':>9} {'ratio':>6} {'recall':>7}")
    rng = np.random.default_rng(7)
    for photons in (500, 1000, 2000, 5000):
        emitters = [np.array([[rng.uniform(1500, 1700), rng.uniform(1500, 1700), 0.0, photons]]) for _ in range(n_iso)]
        frames, truth, _ = simulate_windows(rng, n_iso, FRAMES, 32, optics, camera, emitters=emitters,
                                            background=np.full(n_iso, 10.0), as_adu=True)
        crlb = float(integrated_gaussian_crlb_nm(photons * camera.qe, 10.0 * camera.qe, sigma0_nm, PIXEL_NM))
        results["isolated"][str(photons)] = {"crlb_x_nm": round(crlb, 2)}
        for name, (method, _) in methods.items():
            s = score([t[:, :3] for t in truth], method(frames, best[name]))
            entry = {"rmse_x_nm": s["rmse_x_nm"], "rmse_over_crlb": round(s["rmse_x_nm"] / crlb, 3),
                     "recall": s["recall"]}
            results["isolated"][str(photons)][name] = entry
            print(f"{photons:>8} {name:<17} {entry['rmse_x_nm']:>10.2f} {crlb:>9.2f} {entry['rmse_over_crlb']:>6.2f} "
                  f"{entry['recall']:>7.3f}")
    if world == "independent":
        results["independent"] = _independent(methods, best, camera, n_dense, n_iso)
    for name, why in missing.items():
        print(f"peer {name}: {why}")
    return results
