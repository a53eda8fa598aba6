"""Offline re-analysis of a recorded stack with the same models the loop runs.

`smartscope localize STACK.tif --out locs.csv` reads any TIFF / OME-TIFF
(memory-mapped where possible), takes the camera calibration from flags or
from the file's metadata, and writes a ThunderSTORM-compatible CSV.
`smartscope count STACK.tif --out counts.csv` counts the emitters of every
frame of a dense SMLM stack (the density the illumination policy regulates).
`smartscope events STACK.tif --out events.csv` scores live-imaging stacks
for fission events.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

from smartscope.inference.counting import count_frame
from smartscope.inference.localization import frame_to_photons, localize_frame
from smartscope.inference.session import LoadedModel, check_fits_frames, load_model
from smartscope.inference.tiling import FrameStatistics, TilePool, frame_statistics, localize_tiled
from smartscope.storage import LocalizationWriter
from smartscope.transport.protocol import CameraParams


class StackError(ValueError):
    """A file that cannot be analysed as an image stack, with what to do about it."""


def open_stack(path: Path) -> tuple[np.ndarray, float | None]:
    """(T, H, W) frames and the pixel size in nm from the metadata, if it says."""
    path = Path(path)
    if not path.is_file():
        raise StackError(f"{path}: no such file")
    try:
        with tifffile.TiffFile(path) as tif:
            pixel_nm = camera_tiff_pixel_nm(tif, path)
            try:
                data = tifffile.memmap(path, series=0, mode="r")
            except ValueError:  # compressed or not contiguous: read it
                data = tif.series[0].asarray()
    except tifffile.TiffFileError as e:
        raise StackError(f"{path}: cannot be read as TIFF ({e})") from e
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise StackError(f"{path}: expected a (frames, y, x) stack of single-channel images, got shape "
                         f"{data.shape}; split channels first")
    if data.dtype.kind not in "uif":
        raise StackError(f"{path}: pixel type {data.dtype} is not camera data (need uint8/16/32 or float)")
    return data, pixel_nm


def camera_tiff_pixel_nm(tif: tifffile.TiffFile, path: Path) -> float | None:
    """StackError unless the TIFF holds single-channel camera frames; their pixel size (nm) if the metadata says."""
    if tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB:
        raise StackError(f"{path}: RGB / multi-sample images (axes {tif.series[0].axes}) are not camera frames; "
                         "save a single-channel stack")
    return _pixel_size_nm(tif)


def _pixel_size_nm(tif: tifffile.TiffFile) -> float | None:
    if tif.is_ome:
        import xml.etree.ElementTree as ET

        root = ET.fromstring(tif.ome_metadata)
        for el in root.iter():
            if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
                unit = el.attrib.get("PhysicalSizeXUnit", "µm")
                scale = {"µm": 1000.0, "um": 1000.0, "nm": 1.0, "mm": 1e6}.get(unit)
                return float(el.attrib["PhysicalSizeX"]) * scale if scale else None
    if tif.is_imagej and tif.imagej_metadata and tif.imagej_metadata.get("unit") in ("micron", "µm", "um"):
        res = tif.pages[0].tags.get("XResolution")
        if res is not None:
            num, den = res.value
            return den / num * 1000.0
    return None


def _open_for_model(stack: Path, pixel_size_nm: float | None, model: str, provider: str,
                    psf_calibration: str | None = None) -> tuple[np.ndarray, float, LoadedModel]:
    """The stack's frames, its pixel size (the flag's, else the metadata's) and the model, checked to fit."""
    frames, meta_nm = open_stack(stack)
    pixel_size_nm = pixel_size_nm or meta_nm
    if pixel_size_nm is None:
        raise StackError(f"{stack}: no pixel size in the metadata; pass --pixel-size-nm")
    loaded = load_model(model, provider, psf_calibration=psf_calibration)
    check_fits_frames(loaded.card, frames.shape[1:], pixel_size_nm)
    return frames, pixel_size_nm, loaded


def _camera_params(pixel_size_nm: float, adu_per_electron: float, offset_adu: float, qe: float,
                   em_gain: float, read_noise_e: float = 0.0) -> CameraParams:
    """The camera calibration of the command-line flags (gain given as ADU per electron, as cameras state it)."""
    return CameraParams(pixel_size_nm=pixel_size_nm, offset_adu=offset_adu, e_per_adu=1.0 / adu_per_electron,
                        qe=qe, em_gain=em_gain, read_noise_e=read_noise_e)


def _show_progress(verb: str, i: int, n: int, t0: float, extra: str = "") -> None:
    """One progress line on stderr, redrawn about 20 times over the stack (frame i of n just done)."""
    if (i + 1) % max(1, n // 20) and i + 1 != n:
        return
    rate = (i + 1) / max(time.perf_counter() - t0, 1e-9)
    tail = f", {extra}" if extra else ""
    print(f"\r  {verb} {i + 1}/{n} frames ({100 * (i + 1) / n:.0f}%, {rate:.0f} frames/s{tail})", end="",
          file=sys.stderr, flush=True)
    if i + 1 == n:
        print(file=sys.stderr)


#: Frames of more pixels than this are localized in tiles (inference/tiling.py, the same localizations as the
#: whole frame): the network needs ~0.9 GB per million pixels of frame (measured peak: 0.94 GB at 1024², 4.2 GB
#: at 2048²), a tile of a TILE_CORE_PX core and its margins ~0.3 GB. In one process tiles cost what their extra
#: pixels cost (margins read twice: 1.15x the pixels at 1024², 1.22x at 2048²; measured 1.07-1.09x the time,
#: `smartscope bench tiling`), so they are worth it where memory is, or with `workers` on idle cores.
TILE_ABOVE_PX = 1024 * 1024
TILE_CORE_PX = 512


def localize_stack(stack: Path, out_csv: Path, *, pixel_size_nm: float | None = None, adu_per_electron: float = 2.0,
                   offset_adu: float = 100.0, qe: float = 0.8, em_gain: float = 1.0, model: str = "localization.onnx",
                   threshold: float = 0.5, provider: str = "auto", progress: bool = True,
                   tile_above_px: int = TILE_ABOVE_PX, tile_core_px: int = TILE_CORE_PX,
                   workers: int = 1, psf_calibration: str | None = None, read_noise_e: float = 0.0
                   ) -> dict[str, float]:
    """Localize every frame of `stack` into `out_csv`; returns counts and speed.

    Frames of more than `tile_above_px` pixels go through the network in
    tiles (cores of about `tile_core_px`), on `workers` processes (1: in this
    process); the table is the same as from whole frames. With `psf_calibration`
    (a bead calibration) the refinement fits that PSF; `read_noise_e` (a sCMOS's
    rms read noise) enters its likelihood.
    """
    frames, pixel_size_nm, loaded = _open_for_model(stack, pixel_size_nm, model, provider, psf_calibration)
    camera = _camera_params(pixel_size_nm, adu_per_electron, offset_adu, qe, em_gain, read_noise_e)
    n, (h, w) = len(frames), frames.shape[1:]
    window = int(loaded.card.get("frames", 1))  # frame i is localized with the frames just before it
    tiled = h * w > tile_above_px
    pool = TilePool(model, workers, core_px=tile_core_px, provider=provider,
                    psf_calibration=psf_calibration) if tiled and workers > 1 else None
    stats: dict[int, FrameStatistics] = {}  # whole-frame statistics the tiles need, once per frame
    writer = LocalizationWriter(Path(out_csv))
    t0 = time.perf_counter()
    try:
        for i in range(n):
            first = max(0, i - window + 1)
            if not tiled:
                locs, background = localize_frame(loaded, np.asarray(frames[first:i + 1]), camera,
                                                  threshold=threshold)
            else:
                photons = frame_to_photons(np.asarray(frames[first:i + 1]), camera)
                stats = {k: stats.get(k) or frame_statistics(photons[k - first], loaded.card)
                         for k in range(first, i + 1)}
                if pool is not None:
                    locs, background = pool.localize(photons, camera, threshold=threshold, stats=list(stats.values()))
                else:
                    locs, background = localize_tiled(loaded, photons, camera, threshold=threshold,
                                                      core_px=tile_core_px, stats=list(stats.values()))
            writer.write(i, locs, background)
            if progress:
                _show_progress("localizing", i, n, t0, f"{writer.rows} localizations")
    finally:
        writer.close()
        if pool is not None:
            pool.close()
    seconds = time.perf_counter() - t0
    return {"frames": n, "localizations": writer.rows, "seconds": round(seconds, 3),
            "frames_per_s": round(n / seconds, 1) if seconds else None, "provider": loaded.provider,
            "tiled": tiled, "workers": workers if tiled else 1}


COUNT_CSV_COLUMNS = ("frame", "emitters", "density [/um2]")


def count_stack(stack: Path, out_csv: Path, *, pixel_size_nm: float | None = None, adu_per_electron: float = 2.0,
                offset_adu: float = 100.0, qe: float = 0.8, em_gain: float = 1.0, model: str = "counting.onnx",
                provider: str = "auto", progress: bool = True) -> dict[str, float | int | None]:
    """Count the emitters on in every frame of a (dense) SMLM stack: one CSV row per frame.

    The same causal window as in a live run: frame i is counted from frames
    i-2..i, so the first frames (before a full window) get an empty count.
    Density is per µm² of the whole field.
    """
    frames, pixel_size_nm, loaded = _open_for_model(stack, pixel_size_nm, model, provider)
    camera = _camera_params(pixel_size_nm, adu_per_electron, offset_adu, qe, em_gain)
    window = int(loaded.card["frames"])
    n, (h, w) = len(frames), frames.shape[1:]
    area_um2 = h * w * (pixel_size_nm / 1000) ** 2
    n_counted = total = 0
    t0 = time.perf_counter()
    with open(out_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COUNT_CSV_COLUMNS)
        for i in range(n):
            if i + 1 < window:
                writer.writerow([i, "", ""])
            else:
                photons = frame_to_photons(np.asarray(frames[i + 1 - window:i + 1]), camera)
                count = len(count_frame(loaded, photons))
                n_counted, total = n_counted + 1, total + count
                writer.writerow([i, count, f"{count / area_um2:.4f}"])
            if progress:
                _show_progress("counting", i, n, t0, f"{total} emitters")
    seconds = time.perf_counter() - t0
    return {"frames": n, "frames_counted": n_counted,
            "mean_density_per_um2": round(total / n_counted / area_um2, 4) if n_counted else None,
            "seconds": round(seconds, 3), "provider": loaded.provider}


EVENT_CSV_COLUMNS = ("frame", "x [nm]", "y [nm]", "score")


def events_in_stack(stack: Path, out_csv: Path, *, pixel_size_nm: float | None = None, model: str = "events.onnx",
                    threshold: float | None = None, provider: str = "auto", progress: bool = True,
                    interval_ms: float | None = None) -> dict:
    """Score every frame of a live-imaging stack for fission events.

    One row per detected event (its location and peak probability); only
    events seen in at least the card's `min_frames` consecutive-ish frames
    are kept (single-frame flickers are noise). A frame without a kept
    detection gets one row with empty x/y and the frame's event score (the
    map's maximum), so every frame's score is in the file. The first frames,
    before the window the card asks for exists (`event_window_for`: from its
    min_window_frames on, a full window for cards without it), are scored 0.
    With `interval_ms` (the time between frames) the window is built as in a
    live run, from frames the card's window_spacing_ms apart; without it,
    from consecutive frames. A pixel size or interval outside the model's
    training draw is warned about on stderr and listed in the summary
    (`outside_training`).
    """
    from smartscope.inference.events import detect_events, event_map, event_window_for, outside_training, persistent

    frames, pixel_size_nm, loaded = _open_for_model(stack, pixel_size_nm, model, provider)
    threshold = loaded.card["threshold"] if threshold is None else threshold
    if interval_ms is not None and not interval_ms > 0:
        raise StackError(f"interval_ms must be > 0, got {interval_ms}")
    outside = outside_training(loaded.card, pixel_size_nm, interval_ms)
    for sentence in outside:
        print(f"warning: {sentence}: its scores there are not measured", file=sys.stderr)
    window = event_window_for(loaded.card, spacing=interval_ms is not None)
    n, t0 = len(frames), time.perf_counter()
    scores, peaks = np.zeros(n), [np.zeros((0, 3)) for _ in range(n)]
    for i in range(n):
        w = window.push(stack, i * (interval_ms or 0.0) / 1000, np.asarray(frames[i], np.float32))
        if w is not None:
            scores[i], peaks[i] = detect_events(event_map(loaded, w), threshold)
        if progress:
            _show_progress("scoring", i, n, t0)
    kept = persistent(peaks, int(loaded.card.get("min_frames", 1)))
    with open(out_csv, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(EVENT_CSV_COLUMNS)
        for i in range(n):
            for x_px, y_px, p in kept[i]:
                writer.writerow([i, f"{x_px * pixel_size_nm:.1f}", f"{y_px * pixel_size_nm:.1f}", f"{p:.4f}"])
            if not len(kept[i]):
                writer.writerow([i, "", "", f"{scores[i]:.4f}"])
    seconds = time.perf_counter() - t0
    return {"frames": n, "detections": int(sum(len(k) for k in kept)), "seconds": round(seconds, 3),
            "provider": loaded.provider, "outside_training": outside}
