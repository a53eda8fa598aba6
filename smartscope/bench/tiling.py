"""Large frames over tiles: the whole frame in one ONNX Runtime session vs its tiles over 1 and 2 worker processes.

`smartscope bench tiling [--json OUT]`. A simulated window of 3 frames
(emitters at 1 /µm², the shipped localization model) of 1024² and 2048² px
(1024² only with `--quick`), localized end to end (per-frame statistics,
network, decoding, refinement; for tiles also cutting, sending them to the
workers and merging):

- `whole`: `localize_photons` in this process, one session with intra-op
  threads = cores;
- `tiles, this process`: the same tiles one after another in that session
  (what tiling costs: the margins read twice, smaller calls);
- `tiles, N workers`: `inference.tiling.TilePool`, N spawned processes with one
  session each of cores / N threads, the same total threads as `whole`.

Median ms per frame over repeats (after one warm-up frame per case, which also
lets ONNX Runtime plan each tile shape; the cases take turns, frame by frame,
so that a change in the machine's load falls on all alike), the ratio to
`whole` in the same run, and a check that every tiled result is the whole
frame's (the same count, row by row in the same order: the largest distance
in nm).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from smartscope.inference.localization import frame_to_photons, localize_photons
from smartscope.inference.session import choose_providers, load_model
from smartscope.inference.tiling import TilePool, localize_tiled, plan_tiles, tile_margin_px
from smartscope.simulation import CameraConfig, OpticsConfig
from smartscope.simulation.tiles import dense_emitters, simulate_windows
from smartscope.transport.protocol import CameraParams

MODEL = "localization.onnx"
THRESHOLD = 0.5


def _window(size_px: int, camera: CameraConfig) -> np.ndarray:
    """(3, size, size) photons: emitters at 1 /µm², 20 photons/px background."""
    rng = np.random.default_rng(size_px)
    emitters = dense_emitters(rng, 1, size_px, camera.pixel_size_nm, 1.0, 500.0)
    frames, _, _ = simulate_windows(rng, 1, 3, size_px, OpticsConfig(), camera, emitters=emitters,
                                    background=np.array([20.0]), as_adu=True)
    params = _params(camera)
    return frame_to_photons(frames[0], params)


def _params(camera: CameraConfig) -> CameraParams:
    return CameraParams(pixel_size_nm=camera.pixel_size_nm, offset_adu=camera.offset_adu,
                        e_per_adu=camera.e_per_adu, qe=camera.qe)


def _time_interleaved(cases: dict[str, Callable[[], np.ndarray]], repeats: int,
                      ) -> dict[str, tuple[list[float], np.ndarray]]:
    """ms per call of each case over `repeats` rounds, after one warm-up call each, and its last result.

    The cases take turns (one call each per round), so a change in the
    machine's load during the run falls on all of them alike.
    """
    out = {name: ([], localize()) for name, localize in cases.items()}
    for _ in range(repeats):
        for name, localize in cases.items():
            t0 = time.perf_counter()
            locs = localize()
            out[name] = (out[name][0] + [(time.perf_counter() - t0) * 1000], locs)
    return out


def _row(size: int, name: str, entry: dict, read: float) -> None:
    print(f"{size:>4}x{size:<4} {name:<22} {entry['tiles']:>5} {read if entry['tiles'] > 1 else 1.0:>7.2f} "
          f"{entry['threads']:>7} {entry['ms_per_frame']:>9.1f} {entry.get('vs_whole', 1.0):>8.2f} "
          f"{entry['localizations']:>6} {entry.get('max_distance_nm', float('nan')):>8.1e}")


def _entry(times_ms: list[float], locs: np.ndarray, tiles: int, threads: str, whole: dict | None) -> dict:
    """One case's figures; beside the whole frame's, the ratio and whether the localizations are the same."""
    entry = {"ms_per_frame": round(float(np.median(times_ms)), 1), "ms": [round(t, 1) for t in times_ms],
             "tiles": tiles, "threads": threads, "localizations": len(locs)}
    if whole is not None:
        entry["same_count"] = len(locs) == whole["localizations"]
        if entry["same_count"]:
            entry["max_distance_nm"] = float(np.hypot(*(locs[:, :2] - whole["locs"][:, :2]).T).max(initial=0.0))
        entry["vs_whole"] = round(entry["ms_per_frame"] / whole["ms_per_frame"], 3)
    return entry


def _one_size(size: int, core_px: int, repeats: int, cores: int, camera: CameraConfig, provider: str) -> dict:
    params = _params(camera)
    window = _window(size, camera)
    model = load_model(MODEL, provider, threads=cores)
    margin_px = tile_margin_px(model)
    tiles = plan_tiles((size, size), core_px, margin_px, int(model.card.get("input_multiple_px", 1)))
    read = sum(t.shape[0] * t.shape[1] for t in tiles) / size**2
    threads = {workers: max(1, cores // workers) for workers in (1, 2)}
    with TilePool(MODEL, 1, core_px=core_px, threads=threads[1], provider=provider) as one, \
            TilePool(MODEL, 2, core_px=core_px, threads=threads[2], provider=provider) as two:  # idle workers do not spin
        timed = _time_interleaved({
            "whole": lambda: localize_photons(model, window, params, threshold=THRESHOLD)[0],
            "tiles, this process": lambda: localize_tiled(model, window, params, threshold=THRESHOLD,
                                                          core_px=core_px, margin_px=margin_px)[0],
            "tiles, 1 worker": lambda: one.localize(window, params, threshold=THRESHOLD)[0],
            "tiles, 2 workers": lambda: two.localize(window, params, threshold=THRESHOLD)[0]}, repeats)
    whole = {**_entry(*timed["whole"], 1, str(cores), None), "locs": timed["whole"][1]}
    cases = {"whole": whole}
    _row(size, "whole", whole, read)
    for name, n_threads in (("tiles, this process", str(cores)), ("tiles, 1 worker", f"1x{threads[1]}"),
                            ("tiles, 2 workers", f"2x{threads[2]}")):
        cases[name] = _entry(*timed[name], len(tiles), n_threads, whole)
        _row(size, name, cases[name], read)
    del whole["locs"]
    return {"pixels_read_per_frame_pixel": round(read, 3), **cases}


def run(quick: bool = False, core_px: int = 512, provider: str = "cpu") -> dict:
    cores = os.cpu_count() or 1
    sizes, repeats = ((1024,), 3) if quick else ((1024, 2048), 5)
    camera = CameraConfig()
    margin_px = tile_margin_px(load_model(MODEL, "cpu", threads=1))
    results: dict = {"model": MODEL, "provider": choose_providers(provider)[0], "cpu_cores": cores, "core_px": core_px,
                     "margin_px": margin_px,
                     "repeats": repeats, "load_average_1min_start": round(os.getloadavg()[0], 2), "sizes": {}}
    print(f"{MODEL}, {cores} cores, tile cores ~{core_px} px, margin {margin_px} px (receptive field + decoding), "
          f"median of {repeats} frames after a warm-up")
    print(f"{'frame':>9} {'case':<22} {'tiles':>5} {'px read':>7} {'threads':>7} {'ms/frame':>9} {'vs whole':>8} "
          f"{'locs':>6} {'max Δ nm':>8}")
    for size in sizes:
        results["sizes"][f"{size}x{size}"] = _one_size(size, core_px, repeats, cores, camera, provider)
    results["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    return results
