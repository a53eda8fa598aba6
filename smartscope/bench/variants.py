"""fp32, int8 and fp16 localization models side by side: accuracy, CPU speed, ONNX Runtime settings.

One run builds the variants (`training.variants.build_variants`, seed 0, into
a temporary folder: what `smartscope train variants --seed 0 --out DIR`
writes, the unshipped ones included) of both shipped widths and measures, for
every model:

- accuracy, with the protocol of `bench localization`: the detection threshold
  tuned on the fp32 model (best Jaccard) and used unchanged for its variants
  (a variant is a drop-in replacement); Jaccard at 2 emitters/µm² and RMSE /
  √CRLB of isolated emitters at 500-5000 photons, on the same frames for every
  model, so the differences are paired; with `world="independent"` also on the
  held-out pupil-function PSF;
- CPU speed: the median ms of one network call (`LoadedModel.run`) on a 256²
  and a 512² frame, with 1 and 2 intra-op threads, at each ONNX Runtime graph
  optimisation level; the sessions of a family (fp32 and its variants, every
  level) are timed round-robin per frame size and thread count, so that every
  ratio is measured in the same run under the same load.

A variant qualifies for shipping when its accuracy loss against its fp32
parent is <= 1 % on every figure (Jaccard, and RMSE / √CRLB at every photon
level, in every world measured); it is faster on CPU when its median at the
service's setting (optimisation `all`) is below the parent's at both sizes and
both thread counts.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from smartscope.bench.localization import (
    FRAMES,
    PIXEL_NM,
    Method,
    dense_set,
    independent_world,
    ours_method,
    pixel_noise_e,
)
from smartscope.evaluation import score
from smartscope.inference.session import GRAPH_OPTIMIZATION, choose_providers, load_model
from smartscope.resources import bundled_path
from smartscope.simulation import CameraConfig, OpticsConfig, astigmatic_sigmas_nm, integrated_gaussian_crlb_nm
from smartscope.simulation.tiles import simulate_windows
from smartscope.training.variants import (
    MAX_LOSS,
    PARENTS,
    PRECISIONS,
    accuracy_losses,
    build_variants,
    variant_name,
)

FRAME_SIZES_PX = (256, 512)
THREADS = (1, 2)
PHOTONS = (500, 1000, 2000, 5000)
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def _models(build_dir: Path) -> dict[str, dict[str, Path]]:
    """{parent name: {"fp32": path, "int8": path, "fp16": path}} for the parents shipped in models/."""
    models_dir = bundled_path("models")
    build_variants(models_dir, build_dir, seed=0)
    return {Path(p).stem: {"fp32": models_dir / p, **{q: build_dir / variant_name(p, q) for q in PRECISIONS}}
            for p in PARENTS if (models_dir / p).is_file()}


def _accuracy(methods: dict[str, Method], camera: CameraConfig, optics: OpticsConfig, threshold: float,
              n_dense: int, n_iso: int) -> dict:
    """Jaccard at 2 /µm² and RMSE / √CRLB per photon level, on our simulator, same frames for every model."""
    out: dict = {"dense_2_per_um2": {}, "isolated": {}}
    frames, truth = dense_set(120, n_dense, 2.0, optics, camera)  # the frames `bench localization` scores at 2 /µm²
    for name, method in methods.items():
        out["dense_2_per_um2"][name] = score([t[:, :3] for t in truth], method(frames, {"threshold": threshold}))
    rng = np.random.default_rng(7)
    sigma0_nm = float(astigmatic_sigmas_nm(np.zeros(1), optics)[0][0])
    for photons in PHOTONS:
        emitters = [np.array([[rng.uniform(1500, 1700), rng.uniform(1500, 1700), 0.0, photons]]) for _ in range(n_iso)]
        frames, truth, _ = simulate_windows(rng, n_iso, FRAMES, 32, optics, camera, emitters=emitters,
                                            background=np.full(n_iso, 10.0), as_adu=True)
        crlb = float(integrated_gaussian_crlb_nm(photons * camera.qe, 10.0 * camera.qe, sigma0_nm, PIXEL_NM,
                                                 read_noise_e=pixel_noise_e(camera)))  # as `bench localization`
        out["isolated"][str(photons)] = {"crlb_x_nm": round(crlb, 2)}
        for name, method in methods.items():
            s = score([t[:, :3] for t in truth], method(frames, {"threshold": threshold}))
            out["isolated"][str(photons)][name] = {"rmse_x_nm": s["rmse_x_nm"], "recall": s["recall"],
                                                   "rmse_over_crlb": round(s["rmse_x_nm"] / crlb, 4)}
    return out


def _speed(family: dict[str, Path], repeats: dict[int, int], provider: str) -> dict:
    """Median ms per network call of one family (fp32 and its variants) for every frame size × threads ×
    optimisation level. Each (size, threads) group is timed round-robin, so its ratios share the load;
    only one group's sessions are held at a time (ONNX Runtime keeps an arena per session: at 512²,
    ~100 MB each)."""
    out = {}
    for size in FRAME_SIZES_PX:
        frame = np.random.default_rng(size).normal(0, 1, (1, FRAMES, size, size)).astype(np.float32)
        for threads in THREADS:
            sessions = {(name, level): load_model(str(path), provider, threads=threads, optimization=level)
                        for name, path in family.items() for level in GRAPH_OPTIMIZATION}
            times: dict = {key: [] for key in sessions}
            for model in sessions.values():
                model.run(frame)  # the first call allocates
            for _ in range(repeats[size]):
                for key, model in sessions.items():
                    t0 = time.perf_counter()
                    model.run(frame)
                    times[key].append(time.perf_counter() - t0)
            del sessions
            out.update({(name, size, threads, level): round(float(np.median(t)) * 1e3, 2)
                        for (name, level), t in times.items()})
    return out


def run(quick: bool = False, world: str = "simulator", provider: str = "cpu") -> dict:
    """Accuracy on the CPU (the same for every provider up to rounding); speed on `provider`."""
    if world not in ("simulator", "independent"):
        raise ValueError(f"unknown world {world!r}; one of simulator, independent")
    optics, camera = OpticsConfig(), CameraConfig()
    n_dense, n_iso = (15, 40) if quick else (60, 1000)
    repeats = {256: 5, 512: 3} if quick else {256: 21, 512: 11}
    results: dict = {"max_loss": MAX_LOSS, "speed_provider": choose_providers(provider)[0], "parents": {}}
    speed: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        families = _models(Path(tmp))
        for parent, paths in families.items():
            methods = {f"{parent}-{q}" if q != "fp32" else parent: ours_method(camera, str(path))[0]
                       for q, path in paths.items()}
            tune_frames, tune_truth = dense_set(1, n_dense, 1.0, optics, camera)
            jis = [score([t[:, :3] for t in tune_truth], methods[parent](tune_frames, {"threshold": t}))["jaccard"]
                   for t in THRESHOLDS]
            threshold = THRESHOLDS[int(np.argmax(jis))]
            print(f"\n{parent}: threshold {threshold} (tuned on fp32, Jaccard {max(jis):.3f}), used for every variant")
            entry: dict = {"threshold": threshold, "simulator": _accuracy(methods, camera, optics, threshold,
                                                                          n_dense, n_iso)}
            if world == "independent":
                entry["independent"] = independent_world({n: (m, []) for n, m in methods.items()},
                                                         dict.fromkeys(methods, {"threshold": threshold}),
                                                         camera, n_dense, n_iso, other_pupils=False)
            entry["sizes_bytes"] = {n: p.stat().st_size for n, p in zip(methods, paths.values(), strict=True)}
            results["parents"][parent] = entry
            _print_accuracy(entry)
            speed.update(_speed(dict(zip(methods, paths.values(), strict=True)), repeats, provider))
    results["speed_ms"] = {f"{n}|{s}px|{t}thr|{lvl}": ms for (n, s, t, lvl), ms in speed.items()}
    _report(results, families, speed)
    return results


def _print_accuracy(entry: dict) -> None:
    worlds = [w for w in ("simulator", "independent") if w in entry]
    print(f"\n{'model':<22} {'world':<12} {'Jaccard 2/µm²':>13} " + " ".join(f"{p:>7}" for p in PHOTONS)
          + "   (RMSE x / √CRLB per photon level)")
    for name in entry["sizes_bytes"]:
        for w in worlds:
            acc = entry[w]
            dense = acc["dense"] if "dense" in acc else acc["dense_2_per_um2"]
            ratios = " ".join(f"{acc['isolated'][str(p)][name]['rmse_over_crlb']:>7.3f}" for p in PHOTONS)
            print(f"{name:<22} {w:<12} {dense[name]['jaccard']:>13.4f} {ratios}", flush=True)


def _report(results: dict, families: dict[str, dict[str, Path]], speed: dict) -> None:
    """Print the speed table and add each variant's verdict to `results`."""
    worlds = [w for w in ("simulator", "independent") if w in next(iter(results["parents"].values()))]
    print(f"\nmedian ms per network call, {results['speed_provider']} (ratio to fp32 at the same setting); "
          "optimisation levels "
          f"{', '.join(GRAPH_OPTIMIZATION)}")
    print(f"{'model':<22} {'frame':>6} {'thr':>3} " + " ".join(f"{lvl:>16}" for lvl in GRAPH_OPTIMIZATION))
    for parent, paths in families.items():
        for q in paths:
            name = f"{parent}-{q}" if q != "fp32" else parent
            for size in FRAME_SIZES_PX:
                for threads in THREADS:
                    ms = {lvl: speed[(name, size, threads, lvl)] for lvl in GRAPH_OPTIMIZATION}
                    cells = [f"{ms[lvl]:>8.1f} ({ms[lvl] / speed[(parent, size, threads, lvl)]:.2f})"
                             for lvl in GRAPH_OPTIMIZATION]
                    print(f"{name:<22} {size:>5}² {threads:>3} " + " ".join(f"{c:>16}" for c in cells))
    print(f"\nverdict (accuracy loss <= {MAX_LOSS:.0%} on every figure; faster: optimisation all, every size and "
          "thread count)")
    results["verdicts"] = {}
    for parent, entry in results["parents"].items():
        for name in list(entry["sizes_bytes"])[1:]:
            losses = {w: accuracy_losses(entry[w], parent, name) for w in worlds}
            worst = max(v for w in losses.values() for v in w.values())
            ratios = {f"{s}px_{t}thr": round(speed[(name, s, t, "all")] / speed[(parent, s, t, "all")], 3)
                      for s in FRAME_SIZES_PX for t in THREADS}
            verdict = {"losses": losses, "worst_loss": worst, "qualifies": worst <= MAX_LOSS,
                       "speed_ratio_to_fp32": ratios, "faster": max(ratios.values()) < 1}
            results["verdicts"][name] = verdict
            print(f"{name:<22} worst loss {worst:+.2%}  {'qualifies' if verdict['qualifies'] else 'does not qualify'};"
                  f" time / fp32 {min(ratios.values()):.2f}-{max(ratios.values()):.2f}")
