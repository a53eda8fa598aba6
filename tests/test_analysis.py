"""`smartscope analyze`: chunked == whole == Dask, outputs other tools read, resume, lost workers, bad input,
and the drift, merge and FRC steps measured against simulated data with known drift and molecules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from smartscope.analysis import AnalysisSettings, analyze
from smartscope.analysis.drift import (
    DriftSettings,
    apply_drift,
    drift_cross_correlation,
    drift_rms_error_nm,
    estimate_drift,
)
from smartscope.analysis.frc import FrcSettings, frc
from smartscope.analysis.localize import LocalizeSettings
from smartscope.analysis.merge import MergeSettings, link, merge, merge_scores
from smartscope.analysis.picasso import LOCS_DTYPE
from smartscope.analysis.synthetic import drift_curve_nm, simulate_drifting_stack
from smartscope.analysis.table import DETECTIONS, read_table
from smartscope.cli import main
from smartscope.render import read_tiff_pixel_nm

N_FRAMES = 240
LONG_FRAMES = 800


def _settings(chunk_frames: int, **kw) -> AnalysisSettings:
    return AnalysisSettings(localize=LocalizeSettings(chunk_frames=chunk_frames),
                            drift=DriftSettings(segment_frames=60), **kw)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    """240 frames of 48² with a known drift (module-scoped: written once)."""
    path = tmp_path_factory.mktemp("stack") / "drifting.ome.tif"
    simulate_drifting_stack(path, N_FRAMES, size_px=48, seed=5)
    return path


@pytest.fixture(scope="module")
def whole(stack, tmp_path_factory) -> Path:
    """The stack analysed in one chunk, in this process: the reference every other way must equal."""
    out = tmp_path_factory.mktemp("whole")
    analyze([stack], out, _settings(10_000), progress=False)
    return out


@pytest.fixture(scope="module")
def long_stack(tmp_path_factory) -> tuple[Path, Path]:
    """800 frames of 48² and their one-chunk analysis: long enough to cut a run in the middle."""
    folder = tmp_path_factory.mktemp("long")
    simulate_drifting_stack(folder / "long.ome.tif", LONG_FRAMES, size_px=48, seed=6)
    analyze([folder / "long.ome.tif"], folder / "whole", _settings(10_000), progress=False)
    return folder / "long.ome.tif", folder / "whole"


def _same_files(a: Path, b: Path, names=("localizations.csv", "drift.csv", "frc.csv")) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_chunked_and_dask_runs_equal_the_whole_stack_and_smartscope_localize(stack, whole, tmp_path, capsys):
    # chunks of 7 frames: the model's 3-frame window crosses an edge in every chunk
    chunked = analyze([stack], tmp_path / "chunked", _settings(7), progress=False)
    _same_files(whole, tmp_path / "chunked")
    assert chunked["chunks"] == -(-N_FRAMES // 7) and chunked["ran_on"] == "this process"
    on_dask = analyze([stack], tmp_path / "dask", _settings(13), workers=2)
    _same_files(whole, tmp_path / "dask")
    assert on_dask["ran_on"] == "dask LocalCluster of 2 workers" and on_dask["chunks"] == -(-N_FRAMES // 13)
    assert f"localized chunk {on_dask['chunks']}/{on_dask['chunks']}" in capsys.readouterr().err
    # the raw localizations are exactly today's whole-stack `smartscope localize`, row for row
    assert main(["analyze", str(stack), "--out", str(tmp_path / "raw"), "--chunk-frames", "11", "--no-drift",
                 "--no-merge"]) == 0
    assert main(["localize", str(stack), "--out", str(tmp_path / "localize.csv"), "--provider", "cpu"]) == 0
    assert (tmp_path / "raw" / "localizations.csv").read_bytes() == (tmp_path / "localize.csv").read_bytes()


def test_outputs_carry_what_other_tools_read(stack, whole):
    summary = json.loads((whole / "summary.json").read_text())
    s = summary["stacks"][0]
    assert summary["complete"] and summary["frames"] == N_FRAMES and not (whole / ".analyze-partial").exists()
    assert s["localizations_raw"] > s["localizations_merged"] == s["localizations"] > 0
    assert s["drift_range_nm"]["x"] > 0 and s["frc_resolution_nm"] > 0
    final = read_table(whole / "localizations.csv")
    assert len(final["frame"]) == s["localizations"] and final[DETECTIONS].sum() == s["localizations_raw"]
    drift = np.loadtxt(whole / "drift.csv", delimiter=",", skiprows=1)
    assert drift.shape == (N_FRAMES, 3) and np.array_equal(drift[:, 0], np.arange(N_FRAMES))
    assert read_tiff_pixel_nm(whole / "render.tif") == pytest.approx(10.0)
    assert tifffile.imread(whole / "render.tif").shape == (480, 480)  # the 48 px × 100 nm field at 10 nm

    import h5py  # Picasso's format, field by field

    with h5py.File(whole / "localizations.hdf5", "r") as f:
        locs = f["locs"][()]
    assert [name for name, _ in LOCS_DTYPE] + ["n"] == list(locs.dtype.names)
    assert locs.dtype["frame"] == np.uint32 and all(locs.dtype[c] == np.float32 for c in ("x", "y", "lpx", "sx"))
    assert np.allclose(locs["x"], final["x [nm]"] / 100.0, atol=1e-4)  # camera pixels
    assert np.allclose(locs["lpx"], final["uncertainty [nm]"] / 100.0, atol=1e-4)
    assert np.array_equal(locs["frame"], final["frame"]) and np.array_equal(locs["n"], final[DETECTIONS])
    assert (locs["sx"] > 0.5).all() and (locs["sy"] > 0.5).all()
    info = list(yaml.safe_load_all((whole / "localizations.yaml").read_text()))
    assert (info[0]["Width"], info[0]["Height"], info[0]["Frames"], info[1]["Pixelsize"]) == (48, 48, N_FRAMES, 100.0)


def test_picasso_reads_the_hdf5_file(whole):
    io = pytest.importorskip("picasso.io")  # picassosr pulls a Qt GUI stack: not installed by the test extra
    locs, info = io.load_locs(str(whole / "localizations.hdf5"))
    assert len(locs) >= 0.99 * len(read_table(whole / "localizations.csv")["frame"])
    assert info[1]["Pixelsize"] == 100.0


def test_a_lost_worker_costs_only_its_chunks(long_stack, tmp_path):
    """A real worker process killed mid-run on a 2-worker LocalCluster (joined by --scheduler): the chunks
    it held run again elsewhere, the chunks already back are not recomputed, the tables are the same."""
    from dask.distributed import Client, LocalCluster

    stack, whole = long_stack
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.get_task_stream()  # starts the scheduler's record of every task run
        pids = client.run(os.getpid)
        out = tmp_path / "out"
        errors: list[BaseException] = []

        def run() -> None:
            try:
                analyze([stack], out, _settings(10), scheduler=cluster.scheduler_address, progress=False)
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        partial = out / ".analyze-partial"
        deadline = time.monotonic() + 120
        while len(list(partial.glob("*.npz"))) < 3:
            assert time.monotonic() < deadline and thread.is_alive(), errors
            time.sleep(0.01)
        done_before = {p.stem for p in partial.glob("*.npz")}
        busy = None
        while busy is None:  # a worker in the middle of a chunk
            assert time.monotonic() < deadline and thread.is_alive(), errors
            busy = next((w for w, keys in client.processing().items() if keys), None)
        os.kill(pids[busy], signal.SIGKILL)
        thread.join(300)
        assert not errors and not thread.is_alive()
        stream = client.get_task_stream()
        events = [e for _, e in client.get_events(busy) if e.get("action") == "remove-worker"]
    _same_files(whole, out)
    assert len(events) == 1
    lost = set(events[0]["processing-tasks"]) | set(events[0]["lost-computed-tasks"])
    runs: dict[str, int] = {}
    for task in stream:
        if task["key"].startswith("smartscope-localize-"):
            runs[task["key"]] = runs.get(task["key"], 0) + 1
    n_chunks = LONG_FRAMES // 10
    assert len(runs) == n_chunks  # every chunk finished
    again = {k for k, n in runs.items() if n > 1}
    assert again <= lost  # a chunk computed twice was one whose result went down with the worker
    assert sum(runs.values()) == n_chunks + len(again)
    chunk_of = {k: f"0000_{int(k.rsplit('-', 1)[1]):09d}" for k in runs}
    assert not {chunk_of[k] for k in again} & done_before  # chunks already back were never redone


def test_an_interrupted_run_resumes_from_its_chunks(long_stack, tmp_path):
    stack, whole = long_stack
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "smartscope", "analyze", str(stack), "--out", str(out), "--chunk-frames", "10",
           "--segment-frames", "60"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / ".analyze-partial"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("*.npz"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)
    proc.kill()
    proc.wait()
    done = len(list(partial.glob("*.npz")))
    assert 2 <= done < LONG_FRAMES // 10, "the run must have been cut before it finished"
    assert not (out / "summary.json").exists()  # nothing presented as complete
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f"resuming an interrupted run: {done} chunks already localized" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chunks_resumed"] == done and summary["chunks"] == LONG_FRAMES // 10
    _same_files(whole, out)


def test_other_settings_start_again_and_say_so(stack, tmp_path, capsys):
    out = tmp_path / "out"
    partial = out / ".analyze-partial"
    partial.mkdir(parents=True)
    (partial / "manifest.json").write_text(json.dumps({"version": 1, "localize": {"threshold": 0.9}}))
    (partial / "0000_000000000.npz").write_bytes(b"a chunk of another run")
    summary = analyze([stack], out, _settings(120))
    assert "holds an unfinished run of other inputs or settings: starting again" in capsys.readouterr().err
    assert summary["chunks_resumed"] == 0 and summary["chunks"] == 2


def test_a_folder_of_runs_and_zarr_stacks_is_one_job(stack, whole, tmp_path):
    """A smartscope multi-position run (frames/frames_p000.ome.tif, …) and an OME-Zarr of the same frames:
    every stack gets its folder; the Zarr gives the TIFF's table exactly."""
    from smartscope.storage.frames import FrameWriter

    frames = tifffile.imread(stack)
    run = tmp_path / "run"
    (run / "frames").mkdir(parents=True)
    for p in range(2):
        tifffile.imwrite(run / "frames" / f"frames_p{p:03d}.ome.tif", frames, ome=True,
                         metadata={"axes": "TYX", "PhysicalSizeX": 0.1, "PhysicalSizeXUnit": "µm"})
    zrun = tmp_path / "zrun"
    zrun.mkdir()
    writer = FrameWriter(zrun, frames.shape[1:], frames.dtype, 100.0, format="zarr")
    for f in frames:
        writer.put(f.copy(), {})
    writer.close()
    out = tmp_path / "out"
    summary = analyze([run, zrun], out, _settings(50), progress=False)
    names = [s["name"] for s in summary["stacks"]]
    assert names == ["frames_p000", "frames_p001", "frames"]
    for name in names:
        _same_files(whole, out / name)


def test_a_run_cut_short_by_a_crash_is_read_to_its_last_whole_frame(stack, whole, tmp_path):
    """The OME-TIFF of a killed acquisition: one page, the other frames' pixels behind it (storage/frames.py)."""
    frames = tifffile.imread(stack)
    cut = tmp_path / "frames.ome.tif"
    tifffile.imwrite(cut, frames[0], photometric="minisblack", ome=False, metadata=None)  # its pixels last
    with open(cut, "ab") as fh:
        fh.write(frames[1:].tobytes() + frames[1, :10].tobytes())  # and part of a frame not written whole
    settings = _settings(10_000).model_copy(update={"localize": LocalizeSettings(chunk_frames=100,
                                                                                 pixel_size_nm=100.0)})
    for _ in range(2):  # results written beside the stack: the second run takes no render.tif for a stack
        summary = analyze([tmp_path], tmp_path, settings, progress=False)
        assert summary["frames"] == N_FRAMES and [s["name"] for s in summary["stacks"]] == ["frames"]
    _same_files(whole, tmp_path)


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _tiff(path: Path, frames: np.ndarray, pixel_um: float | None = 0.1) -> Path:
    meta = {"axes": "TYX"} | ({"PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm"} if pixel_um else {})
    tifffile.imwrite(path, frames, ome=pixel_um is not None, photometric="minisblack", metadata=meta)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: [d / "missing.tif"], "no such file or folder"),
    (lambda d: [_text(d / "bad.tif", "not a tiff")], "cannot be read as TIFF"),
    (lambda d: [d], "no TIFF / OME-TIFF or OME-Zarr stack in this folder"),
    (lambda d: [_tiff(d / "a.tif", np.full((4, 32, 32), 100, np.uint16)),
                _tiff(d / "b.tif", np.full((4, 32, 32), 100, np.uint16), 0.105)], "different pixel sizes"),
    (lambda d: [_tiff(d / "a.tif", np.full((4, 32, 32), 100, np.uint16), None)], "pass --pixel-size-nm"),
    (lambda d: [_tiff(d / "a.tif", np.full((4, 32, 32), 100, np.uint16), 0.16)], "more than 10% off"),
    (lambda d: [_tiff(d / "flat.tif", np.full((20, 32, 32), 100, np.uint16))], "no localizations in"),
])
def test_bad_input_gets_one_clear_message_and_no_summary(tmp_path, make, message):
    (tmp_path / "in").mkdir()
    inputs = make(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["analyze", *map(str, inputs), "--out", str(out)])
    assert message in str(e.value) and str(e.value).startswith("error: ")
    assert not (out / "summary.json").exists()


# -- the steps, measured on the simulator's truth (known drift, known molecules) ------------------------------


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> tuple[dict, np.ndarray]:
    """3000 frames of 48² with 200 nm of drift: every emitter, with its molecule, as the camera saw it."""
    return simulate_drifting_stack(tmp_path_factory.mktemp("truth") / "s.ome.tif", 3000, size_px=48, seed=9)


def _noisy(truth: dict, sigma_nm: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = len(truth["frame"])
    table = {c: truth[c].copy() for c in truth if c != "id"}
    table["x [nm]"] = truth["x [nm]"] + rng.normal(0, sigma_nm, n)
    table["y [nm]"] = truth["y [nm]"] + rng.normal(0, sigma_nm, n)
    table["uncertainty [nm]"] = np.full(n, sigma_nm)
    return table


def test_rcc_recovers_a_known_drift_better_than_plain_cross_correlation(truth):
    table, true_drift = _noisy(truth[0], 15.0), truth[1]
    assert np.allclose(true_drift, drift_curve_nm(3000, 200.0))
    s = DriftSettings(segment_frames=300)
    rcc = estimate_drift(table, 3000, s)
    baseline = drift_cross_correlation(table, 3000, s)
    uncorrected = drift_rms_error_nm(np.zeros_like(true_drift), true_drift)
    assert uncorrected > 50
    assert drift_rms_error_nm(rcc, true_drift) < 6.0
    assert drift_rms_error_nm(baseline, true_drift) < 15.0
    fs = FrcSettings(pixel_nm=5.0)
    assert frc(apply_drift(table, rcc), fs) < 0.8 * frc(table, fs)  # sharper once corrected


def test_merging_keeps_molecules_apart_and_blinks_whole(truth):
    table = _noisy(truth[0], 10.0)
    ms = MergeSettings(max_distance_nm=50.0, max_gap_frames=1)
    scores = merge_scores(link(table, ms), truth[0]["id"], table["frame"], ms.max_gap_frames)
    assert scores["blinks_multi"] > 300
    assert scores["purity"] > 0.9 and scores["split_fraction"] < 0.1
    merged = merge(table, ms)
    assert merged[DETECTIONS].sum() == len(table["frame"]) and scores["groups"] == len(merged["frame"])
    # a merged blink is as precise as its localizations together
    many = merged[DETECTIONS] >= 4
    assert np.allclose(merged["uncertainty [nm]"][many], 10.0 / np.sqrt(merged[DETECTIONS][many]))


def test_frc_resolution_follows_the_localization_precision(truth):
    no_drift = apply_drift(truth[0], truth[1])
    fine, coarse = frc(_noisy(no_drift, 5.0)), frc(_noisy(no_drift, 25.0))
    assert fine is not None and coarse is not None and 1.5 * fine < coarse


def test_each_step_runs_alone_on_a_csv(truth, tmp_path, capsys):
    from smartscope.analysis.table import write_table

    locs = tmp_path / "locs.csv"
    write_table(locs, _noisy(truth[0], 15.0))
    assert main(["drift", str(locs), "--out", str(tmp_path / "d.csv"), "--segment-frames", "300",
                 "--drift-csv", str(tmp_path / "curve.csv")]) == 0
    curve = np.loadtxt(tmp_path / "curve.csv", delimiter=",", skiprows=1)[:, 1:]
    assert drift_rms_error_nm(curve, truth[1]) < 6.0
    assert main(["merge", str(tmp_path / "d.csv"), "--out", str(tmp_path / "m.csv")]) == 0
    assert main(["filter", str(tmp_path / "m.csv"), "--out", str(tmp_path / "f.csv"), "--min-photons", "3000"]) == 0
    assert main(["frc", str(tmp_path / "f.csv")]) == 0
    drift, merged, kept, resolution = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert merged["localizations"] == drift["localizations"] > merged["merged"] == kept["localizations"]
    assert 0 < kept["kept"] < kept["localizations"]
    assert (read_table(tmp_path / "f.csv")["intensity [photon]"] >= 3000).all()
    assert resolution["frc_resolution_nm"] > 0
    with pytest.raises(SystemExit, match="no column 'x \\[nm\\]'"):
        (tmp_path / "other.csv").write_text("frame,x,y\n0,1,2\n")
        main(["merge", str(tmp_path / "other.csv"), "--out", str(tmp_path / "o.csv")])


def test_the_daemon_and_the_cli_parser_import_no_analysis_dependencies():
    code = ("import sys, smartscope.service, smartscope.cli; smartscope.cli.build_parser(); "
            "print(sorted(m for m in ('dask', 'distributed', 'h5py', 'zarr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
