"""`smartscope analyze INPUT... --out DIR`: localize, correct drift, merge, filter, measure FRC, write.

1. **Find the stacks** (analysis/sources.py) and check them all before any
   work: readable, one pixel size for the job, at the model's scale.
2. **Localize in chunks** of `chunk_frames` (analysis/localize.py), here in
   order or on a Dask cluster (analysis/cluster.py); memory holds one chunk of
   frames per process. Each finished chunk's table is written to
   `DIR/.analyze-partial/` (atomically), beside a manifest of the inputs and
   localization settings: rerunning an interrupted command resumes from the
   chunks there, or says it starts again when the inputs or settings changed.
3. **Per stack**: RCC drift (analysis/drift.py) → merging (merge.py) →
   filtering (filters.py) → FRC (frc.py), then the outputs, each written to a
   temporary name and renamed: `localizations.csv` (ThunderSTORM),
   `localizations.hdf5` + `.yaml` (Picasso), `drift.csv`, `frc.csv`,
   `render.tif` (smartscope.render). One stack writes into DIR, several each
   into DIR/<stack name>/.
4. **`summary.json` last**: its presence says the results are complete (an
   earlier one is removed when a run starts); then the partial folder goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartscope.analysis.drift import DriftError, DriftSettings, apply_drift, estimate_drift, write_drift_csv
from smartscope.analysis.filters import FilterSettings, filter_table
from smartscope.analysis.frc import FrcSettings, frc_curve, frc_resolution_nm, write_frc_csv
from smartscope.analysis.localize import LocalizeSettings, chunk_starts, localize_chunk
from smartscope.analysis.merge import MergeSettings, merge
from smartscope.analysis.picasso import write_picasso
from smartscope.analysis.sources import Stack, discover
from smartscope.analysis.table import UNC, Z, concat, write_table
from smartscope.inference.offline import StackError
from smartscope.inference.session import ModelError, check_fits_frames, read_card

PARTIAL_DIR = ".analyze-partial"
RENDER_NAME = "render.tif"
MANIFEST_VERSION = 1


class AnalysisError(ValueError):
    """A job that cannot go on, with what to do about it."""


class AnalysisSettings(BaseModel):
    """Every setting of a run (recorded in summary.json); the localize part also decides what can be resumed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    localize: LocalizeSettings = Field(default_factory=LocalizeSettings)
    drift: DriftSettings | None = Field(default_factory=DriftSettings, description="None: no drift correction")
    merge: MergeSettings | None = Field(default_factory=MergeSettings, description="None: no merging")
    filter: FilterSettings = Field(default_factory=FilterSettings)
    frc: FrcSettings = Field(default_factory=FrcSettings)
    render_pixel_nm: float = Field(10.0, gt=0)


def analyze(inputs: list[str | Path], out_dir: Path, settings: AnalysisSettings | None = None, *,
            scheduler: str | None = None, workers: int = 1, progress: bool = True) -> dict:
    """Run the whole pipeline (see the module docstring); returns the summary written to DIR/summary.json.

    scheduler: a Dask scheduler address; workers > 1 without it: a LocalCluster of that many processes;
    neither: everything in this process.
    """
    settings = settings or AnalysisSettings()
    if workers < 1:
        raise AnalysisError(f"--workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    stacks, pixels = _checked_stacks(inputs, settings.localize, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()  # the old results are being replaced: never shown as complete meanwhile
    partial = _Partial(out_dir / PARTIAL_DIR, stacks, settings.localize, progress)
    tasks = [(i, s, start, min(start + settings.localize.chunk_frames, s.n_frames), pixels[i])
             for i, s in enumerate(stacks) for start in chunk_starts(s.n_frames, settings.localize.chunk_frames)]
    todo = [t for t in tasks if not partial.has(t[0], t[2])]
    counter = _Progress(len(tasks), len(tasks) - len(todo), progress)
    t_loc = time.perf_counter()

    def done(task, table) -> None:
        partial.save(task[0], task[2], table)
        counter.chunk_done(task[3] - task[2], len(table["frame"]))

    try:
        if scheduler or workers > 1:
            from smartscope.analysis.cluster import ClusterError, dask_client, run_tasks

            try:
                with dask_client(scheduler, workers) as client:
                    run_tasks(client, todo, settings.localize, partial.job, done)
            except ClusterError as e:
                raise AnalysisError(str(e)) from None
            where = f"dask scheduler {scheduler}" if scheduler else f"dask LocalCluster of {workers} workers"
        else:
            for task in todo:
                _, stack, start, stop, pixel_nm = task
                done(task, localize_chunk(stack, start, stop, settings.localize, pixel_nm))
            where = "this process"
    except (StackError, ModelError) as e:  # e.g. a file cut short or changed since the start
        raise AnalysisError(f"{e} (the chunks done so far are kept: rerun to resume)") from None
    localize_s = time.perf_counter() - t_loc
    tables = [concat([partial.load(i, start) for start in chunk_starts(s.n_frames, settings.localize.chunk_frames)])
              for i, s in enumerate(stacks)]
    empty = [s.path for s, t in zip(stacks, tables, strict=True) if not len(t["frame"])]
    if empty:
        raise AnalysisError(f"no localizations in {', '.join(empty)} (threshold {settings.localize.threshold}): "
                            "check that it is SMLM data and the camera calibration (--offset-adu, "
                            "--adu-per-electron); leave it out to analyse the rest (the others' chunks are kept)")
    card = read_card(settings.localize.model)[1]
    results = []
    for stack, table, pixel_nm in zip(stacks, tables, pixels, strict=True):
        folder = out_dir if len(stacks) == 1 else out_dir / stack.name
        folder.mkdir(exist_ok=True)
        results.append(_postprocess(stack, table, pixel_nm, settings, card, folder, out_dir))
    frames = sum(s.n_frames for s in stacks)
    summary = {"complete": True, "stacks": results, "frames": frames,
               "localizations": sum(r["localizations"] for r in results),
               "ran_on": where, "chunks": len(tasks), "chunks_resumed": len(tasks) - len(todo),
               "localize_seconds": round(localize_s, 2), "seconds": round(time.perf_counter() - t0, 2),
               "frames_per_s": round(frames / (time.perf_counter() - t0), 1),
               "settings": settings.model_dump(mode="json")}
    _write_json(summary_path, summary)
    partial.remove()
    return summary


def _is_output(path: Path, out_dir: Path) -> bool:
    """A render this pipeline wrote (in DIR or DIR/<stack>/): found beside the inputs, it is no stack."""
    return path.name == RENDER_NAME and path.resolve().is_relative_to(out_dir.resolve())


def _checked_stacks(inputs: list[str | Path], s: LocalizeSettings, out_dir: Path) -> tuple[list[Stack], list[float]]:
    """The stacks and their pixel sizes, every input checked before any work starts."""
    if not inputs:
        raise AnalysisError("no input: name stacks or folders to analyse")
    try:
        stacks = [st for st in discover(inputs) if not _is_output(Path(st.path), out_dir)]
        card = read_card(s.model)[1]
    except (StackError, ModelError) as e:
        raise AnalysisError(str(e)) from None
    if not stacks:
        raise AnalysisError(f"the only TIFF in {', '.join(map(str, inputs))} is an earlier run's {RENDER_NAME}")
    pixels = [s.pixel_size_nm or st.pixel_size_nm for st in stacks]
    unknown = [st.path for st, p in zip(stacks, pixels, strict=True) if p is None]
    if unknown:
        raise AnalysisError(f"no pixel size in the metadata of {', '.join(unknown)}; pass --pixel-size-nm")
    if len({round(p, 3) for p in pixels}) > 1:
        listing = ", ".join(f"{st.path} ({p:g} nm)" for st, p in zip(stacks, pixels, strict=True))
        raise AnalysisError(f"the inputs have different pixel sizes: {listing}; analyse each pixel size as its own "
                            "job (one drift, render and FRC scale per job)")
    for st, p in zip(stacks, pixels, strict=True):
        try:
            check_fits_frames(card, (st.height, st.width), p)
        except ModelError as e:
            raise AnalysisError(f"{st.path}: {e}") from None
    return stacks, pixels


class _Partial:
    """The chunks finished so far, on disk, and the manifest that says what they are chunks of."""

    def __init__(self, folder: Path, stacks: list[Stack], settings: LocalizeSettings, progress: bool) -> None:
        self.folder = folder
        manifest = {"version": MANIFEST_VERSION, "localize": settings.model_dump(mode="json"),
                    "stacks": [s.signature() for s in stacks]}
        self.job = hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
        path = folder / "manifest.json"
        if folder.exists():
            try:
                same = json.loads(path.read_text()) == manifest
            except (OSError, ValueError):
                same = False
            if same:
                done = len(list(folder.glob("*.npz")))
                if progress:
                    print(f"resuming an interrupted run: {done} chunks already localized", file=sys.stderr)
                return
            if progress:
                print(f"{folder.parent} holds an unfinished run of other inputs or settings: starting again",
                      file=sys.stderr)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        _write_json(path, manifest)

    def _path(self, stack: int, start: int) -> Path:
        return self.folder / f"{stack:04d}_{start:09d}.npz"

    def has(self, stack: int, start: int) -> bool:
        return self._path(stack, start).exists()

    def save(self, stack: int, start: int, table: dict[str, np.ndarray]) -> None:
        path = self._path(stack, start)
        tmp = path.with_name(path.name + ".part")
        with open(tmp, "wb") as fh:
            np.savez(fh, **{f"c{k}": v for k, v in enumerate(table.values())}, names=np.array(list(table)))
        os.replace(tmp, path)

    def load(self, stack: int, start: int) -> dict[str, np.ndarray]:
        with np.load(self._path(stack, start)) as z:
            return {str(name): z[f"c{k}"] for k, name in enumerate(z["names"])}

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _Progress:
    """One line on stderr, redrawn as chunks finish: chunks done, speed, localizations."""

    def __init__(self, chunks: int, resumed: int, show: bool) -> None:
        self.chunks, self.done, self.show = chunks, resumed, show
        self.frames_done = self.locs = 0
        self.t0 = time.perf_counter()

    def chunk_done(self, frames: int, locs: int) -> None:
        self.done += 1
        self.frames_done += frames
        self.locs += locs
        if self.show:
            rate = self.frames_done / max(time.perf_counter() - self.t0, 1e-9)
            print(f"\r  localized chunk {self.done}/{self.chunks} ({rate:.0f} frames/s, {self.locs} localizations)",
                  end="\n" if self.done == self.chunks else "", file=sys.stderr, flush=True)


def _postprocess(stack: Stack, table: dict[str, np.ndarray], pixel_nm: float, settings: AnalysisSettings,
                 card: dict, folder: Path, out_dir: Path) -> dict:
    """Drift, merge, filter, FRC and the files of one stack; its entry in summary.json."""
    from smartscope.inference.refine import astigmatic_sigmas_px
    from smartscope.render import render_localizations, write_render_tiff

    n = stack.n_frames
    result: dict = {"name": stack.name, "path": stack.path, "frames": n, "pixel_size_nm": pixel_nm,
                    "localizations_raw": len(table["frame"])}
    drift_nm = np.zeros((n, 2))
    if settings.drift is not None:
        try:
            drift_nm = estimate_drift(table, n, settings.drift)
            result["drift_range_nm"] = {"x": round(float(np.ptp(drift_nm[:, 0])), 1),
                                        "y": round(float(np.ptp(drift_nm[:, 1])), 1)}
        except DriftError as e:
            result["drift_skipped"] = str(e)
    corrected = apply_drift(table, drift_nm)
    result["frc_before_drift_nm"] = _frc_or_none(table, settings.frc)
    result["frc_after_drift_nm"] = _frc_or_none(corrected, settings.frc)
    merged = merge(corrected, settings.merge) if settings.merge is not None else corrected
    final = filter_table(merged, settings.filter)
    result["localizations_merged"] = len(merged["frame"])
    result["localizations"] = len(final["frame"])
    files = {"localizations": folder / "localizations.csv", "picasso": folder / "localizations.hdf5",
             "drift": folder / "drift.csv", "frc": folder / "frc.csv", "render": folder / RENDER_NAME}
    write_table(files["localizations"], final)
    if "astigmatism" in card:
        sx, sy = astigmatic_sigmas_px(final[Z], card["astigmatism"], pixel_nm)
    else:
        sx = sy = np.full(len(final["frame"]), card["psf_sigma_nm"] / pixel_nm)
    write_picasso(files["picasso"], final, pixel_size_nm=pixel_nm, width_px=stack.width, height_px=stack.height,
                  n_frames=n, sx_px=sx, sy_px=sy, source=stack.path,
                  steps={"Drift correction": "RCC" if "drift_range_nm" in result else "none",
                         "Merged": settings.merge is not None})
    write_drift_csv(files["drift"], drift_nm)
    try:
        q, curve = frc_curve(final, settings.frc)
        result["frc_resolution_nm"] = _round(frc_resolution_nm(q, curve))
        write_frc_csv(files["frc"], q, curve)
    except ValueError as e:  # too few localizations or frames for two halves
        result["frc_resolution_nm"], result["frc_skipped"] = None, str(e)
        files.pop("frc")
    image = render_localizations(final["x [nm]"], final["y [nm]"], pixel_nm=settings.render_pixel_nm,
                                 blur_nm=float(np.median(final[UNC])) if len(final[UNC]) else None,
                                 extent_nm=(0.0, 0.0, stack.width * pixel_nm, stack.height * pixel_nm))
    write_render_tiff(files["render"], image, settings.render_pixel_nm)
    result["files"] = {k: str(p.relative_to(out_dir)) for k, p in files.items()}
    return result


def _frc_or_none(table: dict[str, np.ndarray], s: FrcSettings) -> float | None:
    try:
        return _round(frc_resolution_nm(*frc_curve(table, s)))
    except ValueError:  # too few localizations or frames for two halves (the final FRC says why)
        return None


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, default=float), encoding="utf-8")
    os.replace(tmp, path)
