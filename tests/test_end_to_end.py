"""The whole loop on real parts: simulated UniMMCore devices, ZeroMQ, a worker process
running the shipped ONNX model, the policy engine, OME-TIFF storage."""

from __future__ import annotations

import contextlib
import csv
import json

import numpy as np
import pytest
import tifffile
from conftest import first_event_window_frame

from smartscope.config import load_config
from smartscope.inference.session import read_card
from smartscope.resources import bundled_path
from smartscope.service import Busy, Daemon
from smartscope.storage import read_localizations


@contextlib.contextmanager
def running_daemon(config, workers: int = 1):
    """A Daemon on private ports with its worker processes ready; closed afterwards."""
    config.transport.frames_address = "tcp://127.0.0.1:0"
    config.transport.results_address = "tcp://127.0.0.1:0"
    daemon = Daemon(config)
    try:
        daemon.spawn_workers(workers)
        daemon.wait_for_workers(workers)
        yield daemon
    finally:
        daemon.close()


def _inference_rows(run_dir) -> list[dict]:
    with open(run_dir / "inference.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _decisions(path, actuator):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r.get("actuator") == actuator and r["outcome"] in ("applied", "clamped")]


def test_closed_loop_end_to_end(config, tmp_path):
    config.acquisition.activation_mw = 2.0  # far too few emitters for the set point
    config.policies[0].params = {"set_point_emitters": 12}
    with running_daemon(config) as daemon:
        run = daemon.start_acquisition(tmp_path / "up", 150)
        with pytest.raises(Busy):
            daemon.start_acquisition(tmp_path / "second", 10)
        assert run.done.wait(90)
        s = json.loads((tmp_path / "up" / "summary.json").read_text())
        assert s["state"] == "finished"
        assert s["frames_acquired"] == s["frames_saved"] == 150
        assert s["frames_inferred"] >= 50 and s["frames_inferred"] + s["frames_dropped_inference"] == 150
        assert s["frames_inferred"] + s["frames_inferred_catch_up"] == 150  # the rest after the run
        assert s["provider"] == "CPUExecutionProvider"
        assert s["latency_ms"]["p50"] is not None and 0 < s["latency_ms"]["p50"] < s["latency_ms"]["p99"] + 1e-9
        stack = tifffile.imread(tmp_path / "up" / "frames.ome.tif")
        assert stack.shape == (150, 64, 64) and stack.dtype == np.uint16
        locs = read_localizations(tmp_path / "up" / "localizations.csv")
        assert len(locs["frame"]) > 50
        ups = _decisions(tmp_path / "up" / "decisions.jsonl", "activation_mw")
        assert s["actions"]["illumination"] == len(ups) >= 3
        # too few emitters: the first move and the net of the first five raise the activation
        assert ups[0]["applied"] > ups[0]["before"]
        assert ups[min(4, len(ups) - 1)]["applied"] > ups[0]["before"]
        # lasers go to their safe value when the run ends
        assert daemon.actuator.snapshot()["activation_mw"] == 0.0

        # the other direction, on the same daemon: far too many emitters
        config.acquisition.activation_mw = 300.0
        daemon.engine.update_params("illumination", {"set_point_emitters": 2})
        run = daemon.start_acquisition(tmp_path / "down", 100)
        assert run.done.wait(60)
        downs = _decisions(tmp_path / "down" / "decisions.jsonl", "activation_mw")
        assert len(downs) >= 2 and downs[0]["applied"] < downs[0]["before"]
        assert downs[min(4, len(downs) - 1)]["applied"] < downs[0]["before"]


def test_worker_runs_the_counting_model_on_consecutive_frames(config, tmp_path):
    config.inference.counting_model = "counting.onnx"
    # 100 ms frames: the worker keeps up even on a loaded machine, so its windows stay consecutive (at 30 ms
    # a CI run beside four CPU-bound jobs dropped frames from the live stream and counted 20 of 60)
    config.acquisition.exposure_ms = config.acquisition.interval_ms = 100
    config.acquisition.activation_mw = 100.0
    with running_daemon(config) as daemon:
        run = daemon.start_acquisition(tmp_path / "count", 60)
        assert run.done.wait(60)
        rows = _inference_rows(tmp_path / "count")
        counted = [int(r["emitter_count"]) for r in rows if r["emitter_count"]]
        assert len(rows) >= 30 and len(counted) >= 0.5 * len(rows) and max(counted) > 0


@pytest.mark.parametrize("event_views", ["card", "one"])
def test_live_mode_scores_events_without_localizing(tmp_path, event_views):
    """The live demo config: no localization model, the event model scores every frame,
    with its mirror views or (event_views: one) without."""
    config = load_config(bundled_path("configs") / "live-demo.yaml")
    config.inference.event_views = event_views
    config.simulation.camera.width_px = config.simulation.camera.height_px = 64
    config.acquisition.interval_ms = 60  # the 3-view event model keeps up on a busy 2-core machine
    card = read_card("events.onnx")[1]
    with running_daemon(config) as daemon:
        assert ("--event-one-view" in daemon.pool.procs[0].args) == (event_views == "one")  # the setting reaches the worker
        # the config sets no thresholds: the frame-rate policy switches where the event card measured it
        params = daemon.engine.slots["frame_rate"].policy.params
        assert (params.upper, params.lower) == (card["switch_threshold"], card["switch_threshold"] / 2)
        run = daemon.start_acquisition(tmp_path / "live", 72)
        assert run.done.wait(60)
        assert run.summary["localizations"] == 0 and run.summary["frames_saved"] == 72
        scores = [float(r["event_score"]) for r in _inference_rows(tmp_path / "live") if r["event_score"] != ""]
        # every frame once the window holds its keyframes, window_spacing_ms apart
        assert len(scores) >= 72 - first_event_window_frame(card, 60) - 3 and all(0.0 <= s <= 1.0 for s in scores)


def test_real_micromanager_demo_adapters_through_the_same_loop(tmp_path):
    """CMMCorePlus + the C++ DemoCamera/DStage from mm-test-adapters, same Daemon code."""
    config = load_config(bundled_path("configs") / "hardware-example.yaml")
    with running_daemon(config) as daemon:
        assert type(daemon.core).__name__ == "CMMCorePlus" and daemon.scope is None
        run = daemon.start_acquisition(tmp_path / "mm", 20, exposure_ms=10)
        assert run.done.wait(60)
        s = run.summary
        assert s["state"] == "finished" and s["frames_acquired"] == s["frames_saved"] == 20
        assert s["frames_inferred"] >= 1
        stack = tifffile.imread(tmp_path / "mm" / "frames.ome.tif")
        assert stack.shape[0] == 20 and stack.shape[1:] == (daemon.core.getImageHeight(), daemon.core.getImageWidth())


@pytest.mark.parametrize("shared_memory", ["on", "off"])
def test_two_workers_share_the_stream_and_every_frame_is_accounted_for(config, tmp_path, shared_memory):
    """A pool of two worker processes: both announce themselves, both serve; each published frame
    has a result or was skipped (by number) by a worker that was behind; none is lost."""
    config.transport.shared_memory = shared_memory
    config.policies = []
    with running_daemon(config, workers=2) as daemon:
        workers = daemon.status()["workers"]
        assert len(workers) == 2 and {w["state"] for w in workers.values()} == {"active"}
        assert all(w["threads"] >= 1 and w["host"] and w["provider"] == "CPUExecutionProvider"
                   for w in workers.values())
        run = daemon.start_acquisition(tmp_path, 120)
        assert run.done.wait(60)
        s = run.summary
        assert s["frames_saved"] == 120 and s["workers"] == 2
        assert s["frames_inferred"] + s["frames_skipped_by_workers"] + s["frames_lost"] == s["frames_published"]
        assert s["frames_lost"] == 0 and s["frames_inferred"] >= 30
        assert s["frames_inferred"] + s["frames_inferred_catch_up"] == 120  # the rest after the run
        assert all(daemon.status()["workers"][w]["results"] > 0 for w in workers)
        assert set(s["latency_stages_ms"]) == {"queue", "transfer", "pre", "inference", "post", "return"}
        assert all(v["p50"] is not None and v["p50"] >= 0 for v in s["latency_stages_ms"].values())
        assert s["latency_stages_ms"]["inference"]["p50"] < s["latency_ms"]["p99"]
        if shared_memory == "on":
            caught_up = s["catch_up"]["frames_offered"] if s["catch_up"] else 0
            assert s["frame_ring"]["written"] == s["frames_published"] + caught_up and s["frame_ring"]["lent"] == 0
        else:
            assert s["frame_ring"] is None
        assert s["malformed_frames"] == {} and s["malformed_results"] == {}
        procs = list(daemon.pool.procs)
    assert all(p.poll() is not None for p in procs)


def test_frames_the_live_stream_replaced_are_localized_after_the_run(config, tmp_path):
    """256² frames every 10 ms outrun one worker: live, most frames are replaced by newer ones; the catch-up then
    sends each of them from the TIFF, so inference.csv and localizations.csv cover every frame, each result
    marked live or catch_up, with the live path's counts and latencies left as they were."""
    config.simulation.camera.width_px = config.simulation.camera.height_px = 256
    config.acquisition.exposure_ms = config.acquisition.interval_ms = 10
    config.acquisition.activation_mw = 20.0
    config.policies = []
    with running_daemon(config) as daemon:
        run = daemon.start_acquisition(tmp_path / "run", 60)
        assert run.done.wait(120)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["state"] == "finished" and s["frames_saved"] == 60
    assert s["frames_waited_for_storage"] == 0 and 0 <= s["frames_pending_storage_peak_mb"] <= 60 * 256 * 256 * 2 / 1e6
    assert s["frames_not_sent"] > 0 and s["frames_skipped_by_workers"] == 0  # replaced live: never queued
    assert s["frames_inferred"] + s["frames_skipped_by_workers"] + s["frames_not_sent"] + s["frames_lost"] == 60
    assert s["catch_up"]["frames_offered"] == 60 - s["frames_inferred"] and s["catch_up"]["not_done"] is None
    assert s["frames_inferred_catch_up"] == s["catch_up"]["frames_inferred"] == 60 - s["frames_inferred"]
    rows = _inference_rows(tmp_path / "run")
    assert sorted(int(r["frame"]) for r in rows) == list(range(60))
    assert sum(r["path"] == "live" for r in rows) == s["frames_inferred"]
    located = {int(f) for f in read_localizations(tmp_path / "run" / "localizations.csv")["frame"]}
    assert len(located) > 50  # ~10 emitters a frame: nearly every frame has localizations
    caught = {int(r["frame"]) for r in rows if r["path"] == "catch_up"}
    assert caught and caught <= set(range(60))


def test_large_frames_go_to_the_workers_in_tiles_and_every_frame_gets_one_result(config, tmp_path):
    """inference.tile_px 128 on 256² frames: the daemon cuts each frame into 4 tiles, two worker processes take
    them as they ask, and each frame's tiles are merged into one result; live and catch-up, every frame is
    inferred once, no tile result is rejected and no frame is left incomplete."""
    config.simulation.camera.width_px = config.simulation.camera.height_px = 256
    config.acquisition.exposure_ms = config.acquisition.interval_ms = 20
    config.acquisition.activation_mw = 20.0
    config.inference.tile_px = 128
    config.policies = []
    with running_daemon(config, workers=2) as daemon:
        assert daemon.tiles_per_frame == 4 and daemon.tiler.margin_px == 36
        run = daemon.start_acquisition(tmp_path / "run", 30)
        assert run.done.wait(120)
        frames = daemon.transport_status()["frames"]
        rejected = daemon.rejected_results()
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["state"] == "finished" and s["frames_saved"] == 30 and s["frames_lost"] == 0
    assert s["frames_inferred"] > 0 and s["frames_inferred"] + s["frames_inferred_catch_up"] == 30
    assert frames["tiles_per_frame"] == 4 and frames["tiled"] >= 30 and frames["sent"] == 4 * frames["tiled"]
    assert frames["tiled_frames_incomplete"] == 0 and not any(rejected.values())
    rows = _inference_rows(tmp_path / "run")
    assert sorted(int(r["frame"]) for r in rows) == list(range(30))
    table = read_localizations(tmp_path / "run" / "localizations.csv")
    assert len({int(f) for f in table["frame"]}) > 25
    for axis in ("x [nm]", "y [nm]"):  # merged in frame coordinates, not a tile's
        assert 0 <= table[axis].min() and table[axis].max() < 256 * config.simulation.camera.pixel_size_nm
        assert table[axis].max() > 200 * config.simulation.camera.pixel_size_nm
