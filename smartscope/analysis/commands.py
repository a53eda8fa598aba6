"""The command-line face of the analysis: arguments of `smartscope analyze` and of each step alone.

`smartscope analyze INPUT... --out DIR` runs the pipeline; `smartscope drift`,
`merge`, `filter` and `frc` run one step on a ThunderSTORM-style CSV (ours or
another tool's). Only argparse here at import: the CLI builds its parser on
every call, the analysis modules load when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _drift_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--segment-frames", type=int, default=1000, help="frames per RCC sub-rendering (default 1000)")
    p.add_argument("--drift-pixel-nm", type=float, default=20.0, help="pixel of the RCC sub-renderings")


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--merge-distance-nm", type=float, default=50.0,
                   help="a blink's localizations in consecutive frames lie within this (default 50)")
    p.add_argument("--merge-gap-frames", type=int, default=1, help="frames a blink may go unseen (default 1)")


def _filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-photons", type=float, default=None)
    p.add_argument("--max-photons", type=float, default=None)
    p.add_argument("--max-uncertainty-nm", type=float, default=None)


def _frc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frc-pixel-nm", type=float, default=5.0, help="pixel of the FRC renderings (default 5)")
    p.add_argument("--frc-block-frames", type=int, default=50, help="frames that go to one FRC half together")
    p.add_argument("--frc-seed", type=int, default=0, help="seed of the random split into halves")


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="stacks (TIFF / OME-TIFF, OME-Zarr) or folders of them (smartscope runs)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pixel-size-nm", type=float, default=None, help="default: from the files' metadata")
    p.add_argument("--adu-per-electron", type=float, default=2.0, help="camera gain (ADU per photoelectron)")
    p.add_argument("--offset-adu", type=float, default=100.0, help="camera baseline (ADU)")
    p.add_argument("--qe", type=float, default=0.8, help="quantum efficiency")
    p.add_argument("--em-gain", type=float, default=1.0, help="EM gain (EMCCD), 1 for sCMOS")
    p.add_argument("--read-noise-e", type=float, default=0.0,
                   help="rms read noise per pixel (electrons; a sCMOS): its variance enters the fit's likelihood")
    p.add_argument("--model", default="localization.onnx")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda", "tensorrt"), default="cpu")
    p.add_argument("--threshold", type=float, default=0.5, help="detection probability threshold")
    p.add_argument("--chunk-frames", type=int, default=1000, help="frames per task (default 1000)")
    _drift_arguments(p)
    p.add_argument("--no-drift", action="store_true", help="no drift correction")
    _merge_arguments(p)
    p.add_argument("--no-merge", action="store_true", help="keep every localization")
    _filter_arguments(p)
    _frc_arguments(p)
    p.add_argument("--render-pixel-nm", type=float, default=10.0, help="pixel of render.tif (default 10)")
    p.add_argument("--scheduler", default=None, help="a Dask scheduler address (tcp://host:8786) to run the chunks on")
    p.add_argument("--workers", type=int, default=1,
                   help="without --scheduler: more than 1 runs a Dask LocalCluster of this many processes")


def add_step_arguments(step: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("locs", help="localizations: ThunderSTORM-style CSV (frame, x [nm], y [nm], ...)")
    if step != "frc":
        p.add_argument("--out", required=True, help="CSV to write")
    {"drift": _drift_arguments, "merge": _merge_arguments, "filter": _filter_arguments, "frc": _frc_arguments}[step](p)
    if step == "drift":
        p.add_argument("--drift-csv", default=None, help="also write the drift curve (frame, x [nm], y [nm])")
    if step == "frc":
        p.add_argument("--out", default=None, help="also write the FRC curve as CSV")


def settings_from_args(args: argparse.Namespace):
    """The AnalysisSettings the flags describe (pydantic checks the values)."""
    from smartscope.analysis.pipeline import AnalysisSettings

    return AnalysisSettings.model_validate({
        "localize": {"pixel_size_nm": args.pixel_size_nm, "adu_per_electron": args.adu_per_electron,
                     "offset_adu": args.offset_adu, "qe": args.qe, "em_gain": args.em_gain,
                     "read_noise_e": args.read_noise_e, "model": args.model,
                     "threshold": args.threshold, "provider": args.provider, "chunk_frames": args.chunk_frames},
        "drift": None if args.no_drift else _drift(args),
        "merge": None if args.no_merge else _merge(args),
        "filter": _filter(args), "frc": _frc(args), "render_pixel_nm": args.render_pixel_nm})


def _drift(a: argparse.Namespace) -> dict:
    return {"segment_frames": a.segment_frames, "pixel_nm": a.drift_pixel_nm}


def _merge(a: argparse.Namespace) -> dict:
    return {"max_distance_nm": a.merge_distance_nm, "max_gap_frames": a.merge_gap_frames}


def _filter(a: argparse.Namespace) -> dict:
    return {"min_photons": a.min_photons, "max_photons": a.max_photons, "max_uncertainty_nm": a.max_uncertainty_nm}


def _frc(a: argparse.Namespace) -> dict:
    return {"pixel_nm": a.frc_pixel_nm, "block_frames": a.frc_block_frames, "seed": a.frc_seed}


def run_step(step: str, args: argparse.Namespace) -> dict:
    """One step on a CSV; returns what it did (printed as JSON by the CLI)."""
    import numpy as np

    from smartscope.analysis import drift, filters, frc, merge
    from smartscope.analysis.table import read_table, write_table

    table = read_table(Path(args.locs))
    rows = len(table["frame"])
    if step == "drift":
        n_frames = int(table["frame"].max()) + 1 if rows else 0
        curve = drift.estimate_drift(table, n_frames, drift.DriftSettings(**_drift(args)))
        write_table(Path(args.out), drift.apply_drift(table, curve))
        if args.drift_csv:
            drift.write_drift_csv(Path(args.drift_csv), curve)
        return {"localizations": rows, "frames": n_frames, "drift_range_nm": {
            "x": round(float(np.ptp(curve[:, 0])), 1), "y": round(float(np.ptp(curve[:, 1])), 1)}}
    if step == "merge":
        merged = merge.merge(table, merge.MergeSettings(**_merge(args)))
        write_table(Path(args.out), merged)
        return {"localizations": rows, "merged": len(merged["frame"])}
    if step == "filter":
        kept = filters.filter_table(table, filters.FilterSettings(**_filter(args)))
        write_table(Path(args.out), kept)
        return {"localizations": rows, "kept": len(kept["frame"])}
    q, curve = frc.frc_curve(table, frc.FrcSettings(**_frc(args)))
    if args.out:
        frc.write_frc_csv(Path(args.out), q, curve)
    res = frc.frc_resolution_nm(q, curve)
    return {"localizations": rows, "frc_resolution_nm": None if res is None else round(res, 1)}
