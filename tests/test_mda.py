"""Acquisitions as pymmcore-plus MDAs: the event feed steers time on any camera, bursts keep the camera's rate."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import useq

from smartscope.acquisition.feed import EventFeed, is_time_lapse
from smartscope.config import PolicySpec, load_config
from smartscope.control.policy import Observation
from smartscope.resources import bundled_path
from smartscope.service import Daemon


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def demo_adapters_config(tmp_path, policies=()):
    """Micro-Manager's C++ demo devices (DemoCamera: no interval property), no workers."""
    config = load_config(bundled_path("configs") / "hardware-example.yaml")
    config.transport.frames_address = "tcp://127.0.0.1:0"
    config.transport.results_address = "tcp://127.0.0.1:0"
    config.inference.workers = 0
    config.inference.require_workers = False
    config.storage.root = str(tmp_path)
    config.policies = list(policies)
    return config


def test_bursts_and_timed_events():
    """A time-lapse at interval 0 is a camera sequence; anything else runs event by event."""
    assert is_time_lapse(useq.MDASequence(time_plan={"interval": 0, "loops": 5}))
    assert not is_time_lapse(useq.MDASequence(time_plan={"interval": 0, "loops": 5}, channels=["DAPI"]))


def test_the_frame_rate_policy_steers_a_camera_without_an_interval_property(tmp_path):
    """On the DemoCamera the frame-rate policy's interval becomes each time point's start time: the
    measured time between frames follows its decisions (slow 200 ms → fast 50 ms → slow)."""
    policy = PolicySpec(name="frame_rate", module="policies.frame_rate",
                        params={"slow_interval_ms": 200, "fast_interval_ms": 50, "upper": 0.8, "lower": 0.5,
                                "min_fast_frames": 12})
    daemon = Daemon(demo_adapters_config(tmp_path, [policy]))
    assert daemon.actuator.property_of("interval_ms") is None  # the DemoCamera has no interval property
    try:
        seen = []

        def score_frames(_img, event, _meta):  # a worker's event score per frame: an event at frames 5-14
            k = len(seen)
            seen.append(k)
            state = daemon.actuator.snapshot()
            obs = Observation(seq=k, t_capture_s=time.time(), n_emitters=0,
                              localizations=np.zeros((0, 7)), background_photons=None, state=state,
                              field_area_um2=1.0, event_score=0.95 if 5 <= k < 15 else 0.05,
                              index=dict(event.index))
            daemon.engine.on_observation(obs)

        daemon.core.mda.events.frameReady.connect(score_frames)
        run = daemon.start_acquisition(tmp_path / "fr", sequence=useq.MDASequence(
            time_plan={"interval": 0.2, "loops": 45}))
        assert run.done.wait(60) and run.state == "finished", run.error
    finally:
        daemon.close()
    rows = _rows(tmp_path / "fr" / "frames.csv")
    t_s = np.array([float(r["t_s"]) for r in rows])
    commanded_ms = np.array([float(r["interval_ms"]) for r in rows])
    assert len(rows) == 45 and [int(r["t"]) for r in rows] == list(range(45))
    assert (commanded_ms == 50).sum() >= 12 and (commanded_ms == 200).sum() >= 15
    steady = np.flatnonzero(commanded_ms[1:] == commanded_ms[:-1]) + 1
    measured_ms = np.diff(t_s)[steady - 1] * 1000
    # the median interval keeps to the command (a shared machine delays a frame now and then; 50 and 200 ms
    # stay far apart either way)
    for interval_ms in (50, 200):
        at = commanded_ms[steady] == interval_ms
        assert abs(np.median(measured_ms[at]) - interval_ms) / interval_ms < 0.10, (interval_ms, measured_ms[at])
    decisions = [d for d in map(json.loads, open(tmp_path / "fr" / "decisions.jsonl"))
                 if d.get("policy") == "frame_rate" and d.get("applied") is not None]
    assert [d["applied"] for d in decisions][:2] == [50.0, 200.0]
    assert all(set(d["index"]) >= {"t"} for d in decisions)


@pytest.mark.parametrize("interval_s", [0.0, 0.02])
def test_a_paused_burst_loses_no_frame_and_keeps_their_order(config, tmp_path, interval_s):
    """Pausing inside a hardware-sequenced burst stops the camera at once; the burst's rest runs on resume."""
    config.inference.workers = 0
    config.acquisition.burst_frames = 50
    config.storage.root = str(tmp_path)
    daemon = Daemon(config)
    try:
        run = daemon.start_acquisition(tmp_path / "p", sequence=useq.MDASequence(
            time_plan={"interval": interval_s, "loops": 120}))
        while run.counts.acquired < 20:
            time.sleep(0.002)
        daemon.pause_acquisition()
        at_pause = run.counts.acquired
        assert run.state == "paused" and at_pause < 120
        assert daemon.actuator.snapshot()["activation_mw"] == 0  # lasers safe while paused
        time.sleep(0.3)
        assert run.counts.acquired == at_pause  # nothing taken while paused
        daemon.resume_acquisition()
        assert run.done.wait(30) and run.state == "finished", run.error
    finally:
        daemon.close()
    rows = _rows(tmp_path / "p" / "frames.csv")
    assert [int(r["t"]) for r in rows] == list(range(120))
    assert run.summary["frames_saved"] == 120 and run.summary["pauses"] == 1


@pytest.fixture
def core_without_interval_property(config):
    """The simulated core, not paced, whose camera interval is not a property (software timing needed)."""
    config.hardware.realtime = False
    config.hardware.devices.interval = None
    daemon = Daemon(config)
    try:
        yield daemon.core
    finally:
        daemon.close()


def test_feed_bursts_until_a_software_interval_is_wanted(core_without_interval_property):
    """With no camera interval property, a steered interval > 0 turns the bursts into timed events."""
    wanted = [None]
    feed = EventFeed(core_without_interval_property, useq.MDASequence(time_plan={"interval": 0, "loops": 30}),
                     interval_ms=lambda: wanted[0], camera_paces=False, delivered=lambda: 9, burst_frames=10)
    events = iter(feed)
    first = next(events)
    assert len(first.events) == 10 and first.min_start_time is None
    wanted[0] = 40.0
    timed = next(events)
    assert not hasattr(timed, "events") and timed.index["t"] == 10


def test_a_paused_burst_switching_to_software_timing_runs_its_rest_first(core_without_interval_property):
    """A burst cut short by a pause (delivered up to ordinal 3) whose rest must then be software-timed:
    the rest comes first, in order, each its own timed event, then the plan goes on."""
    wanted = [None]
    feed = EventFeed(core_without_interval_property, useq.MDASequence(time_plan={"interval": 0, "loops": 12}),
                     interval_ms=lambda: wanted[0], camera_paces=False, delivered=lambda: 3, burst_frames=8)
    events = iter(feed)
    assert len(next(events).events) == 8
    wanted[0] = 30.0
    assert [next(events).index["t"] for _ in range(6)] == [4, 5, 6, 7, 8, 9]


def _plan(kind: str) -> tuple[dict, list[str]]:
    """2 positions x 2 channels x 3 z x 4 time points, on each microscope's own channel presets."""
    if kind == "demo adapters":
        positions, channels = [{"x": 0, "y": 0, "z": 1.0}, {"x": 100, "y": 50, "z": 2.0}], ["DAPI", "FITC"]
    else:
        positions, channels = [{"x": 0, "y": 0, "z": 0.5}, {"x": 6.4, "y": 0, "z": 1.0}], ["SMLM", "Widefield"]
    return {"stage_positions": positions, "channels": channels, "z_plan": {"range": 1.0, "step": 0.5},
            "time_plan": {"interval": 0, "loops": 4}, "axis_order": "tpcz"}, channels


def _read_back(run_dir, fmt: str, positions: int) -> list:
    """Per position, the stored (t, c, z, y, x) array: OME-TIFF through tifffile, OME-Zarr through tensorstore."""
    if fmt == "tiff":
        import tifffile

        files = sorted((run_dir / "frames").glob("frames_p*.ome.tif"))
        assert len(files) == positions
        out = []
        for f in files:
            with tifffile.TiffFile(f) as tif:
                assert tif.is_ome and tif.series[0].axes == "TCZYX"
                out.append(tif.series[0].asarray())
        return out
    import tensorstore as ts

    root = run_dir / "frames.ome.zarr"
    out = []
    for p in range(positions):
        meta = json.loads((root / str(p) / "zarr.json").read_text())
        assert [a["name"] for a in meta["attributes"]["ome"]["multiscales"][0]["axes"]] == ["t", "c", "z", "y", "x"]
        out.append(ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / str(p) / "0")}}
                           ).result().read().result())
    return out


@pytest.mark.parametrize(("kind", "fmt"), [("demo adapters", "tiff"), ("simulated", "tiff"), ("simulated", "zarr")])
def test_a_multi_dimensional_plan_runs_through_the_api(config, tmp_path, kind, fmt):
    """Through the API: all 48 frames on disk once, each readable at its (t, p, c, z) index (tifffile,
    or tensorstore for OME-Zarr) and equal to the frame the camera gave; each stamped with the stage and
    focus positions of the plan; progress per axis; the counts add up."""
    from test_api import AUTH, TOKEN, serve

    from smartscope.api import create_app

    if kind == "demo adapters":
        config = demo_adapters_config(tmp_path)
    else:
        config.inference.workers = 0
        config.storage.root = str(tmp_path)
    config.storage.format = fmt
    daemon = Daemon(config)
    body, channels = _plan(kind)
    taken = {}  # (t, p, c, z) -> the frame as the camera gave it
    daemon.core.mda.events.frameReady.connect(lambda img, event, _meta: taken.__setitem__(
        tuple(event.index.get(a, 0) for a in "tpcz"), img.copy()))
    try:
        with serve(create_app(daemon, token=TOKEN)) as base:
            import httpx

            client = httpx.Client(base_url=base, timeout=30)
            assert set(channels) <= set(client.get("/channels").json()["presets"])
            r = client.post("/acquisitions", json={"sequence": body, "name": "mda"}, headers=AUTH)
            assert r.status_code == 201, r.text
            assert r.json()["frames_requested"] == 48
            assert daemon.run.done.wait(60) and daemon.run.state == "finished", daemon.run.error
            info = client.get(f"/acquisitions/{r.json()['id']}").json()
    finally:
        daemon.close()
    assert info["progress"] == {"t": {"done": 4, "of": 4}, "p": {"done": 2, "of": 2}, "c": {"done": 2, "of": 2},
                                "z": {"done": 3, "of": 3}}
    s = info["summary"]
    assert s["frames_acquired"] == s["frames_saved"] == 48
    assert s["frames_acquired"] == (s["frames_inferred"] + s["frames_skipped_by_workers"] + s["frames_not_sent"]
                                    + s["frames_lost"])
    rows = _rows(tmp_path / "mda" / "frames.csv")
    index = [(int(r["t"]), int(r["p"]), int(r["c"]), int(r["z"])) for r in rows]
    assert len(index) == len(set(index)) == len(taken) == 48  # each (t, p, c, z) once
    stored = _read_back(tmp_path / "mda", fmt, positions=2)
    plan = useq.MDASequence(**body)
    for event in plan:  # every frame where the plan put it
        t, p, c, z = (event.index[a] for a in "tpcz")
        np.testing.assert_array_equal(stored[p][t, c, z], taken[(t, p, c, z)])
        row = rows[index.index((t, p, c, z))]
        assert row["channel"] == channels[c]
        assert float(row["x_um"]) == pytest.approx(event.x_pos, abs=0.01)
        assert float(row["y_um"]) == pytest.approx(event.y_pos, abs=0.01)
        assert float(row["z_um"]) == pytest.approx(event.z_pos, abs=0.01)


def test_a_focus_correction_stays_with_its_position_and_other_channels_are_not_inferred(config, tmp_path):
    """A focus move decided on a frame of position 1 shifts position 1's later frames (the plan's Z + the
    correction, as pymmcore-plus keeps autofocus corrections) and not position 0's; with
    inference.channel: SMLM the Widefield frames are stored and never inferred."""
    from test_end_to_end import running_daemon

    config.inference.channel = "SMLM"
    config.storage.root = str(tmp_path)
    config.policies = [PolicySpec(name="step", module="stepping_policy")]
    body = {"stage_positions": [{"x": 0, "y": 0, "z": 0.5}, {"x": 6.4, "y": 0, "z": 1.0}],
            "channels": ["SMLM", "Widefield"], "z_plan": {"range": 0.5, "step": 0.25},
            "time_plan": {"interval": 0.6, "loops": 4}, "axis_order": "tpcz"}
    with running_daemon(config) as daemon:
        run = daemon.start_acquisition(tmp_path / "focus", sequence=useq.MDASequence(**body))
        assert run.done.wait(60) and run.state == "finished", run.error
        s = run.summary
    rows = _rows(tmp_path / "focus" / "frames.csv")
    inferred = {int(r["frame"]) for r in _rows(tmp_path / "focus" / "inference.csv")}
    widefield = {int(r["frame"]) for r in rows if r["channel"] == "Widefield"}
    assert len(rows) == 48 and len(widefield) == 24 and not inferred & widefield
    assert s["frames_inferred"] >= 12 and s["frames_not_sent"] >= 24
    decisions = [json.loads(line) for line in open(tmp_path / "focus" / "decisions.jsonl")]
    (step,) = [d for d in decisions if d.get("policy") == "step"]
    assert step["index"]["p"] == 1 and step["index"]["c"] == 0 and step["outcome"] == "applied"
    t_step = step["index"]["t"]
    assert t_step < 3
    plan = {(e.index["t"], e.index["p"], e.index["c"], e.index["z"]): e.z_pos for e in useq.MDASequence(**body)}
    for r in rows:
        t, p, c, z = (int(r[a]) for a in "tpcz")
        shift_um = float(r["z_um"]) - plan[(t, p, c, z)]
        if p == 0 or t < t_step:
            assert shift_um == pytest.approx(0.0, abs=1e-6), r
        elif t > t_step:  # (at t_step itself, the slices taken after the result came are corrected too)
            assert shift_um == pytest.approx(0.2, abs=1e-6), r


def test_grids_position_sub_sequences_and_autofocus_run_on_the_demo_adapters(tmp_path):
    """Every kind of useq plan: a position with its own grid sub-sequence, another without, an autofocus
    plan per position (no image: frames are counted and stored without it), on the C++ demo devices;
    each tile where the plan (tiles of the camera's field of view) puts it."""
    daemon = Daemon(demo_adapters_config(tmp_path))
    body = {"stage_positions": [{"x": 0, "y": 0, "z": 1, "sequence": {"grid_plan": {"rows": 2, "columns": 2}}},
                                {"x": 2000, "y": 0, "z": 2}],
            "channels": ["DAPI"], "time_plan": {"interval": 0, "loops": 2},
            "autofocus_plan": {"autofocus_device_name": "Z", "autofocus_motor_offset": 0, "axes": ["p"]}}
    try:
        fov_um = daemon.core.getImageWidth() * daemon.core.getPixelSizeUm()
        run = daemon.start_acquisition(tmp_path / "grid", sequence=useq.MDASequence(**body))
        assert run.n_frames == 10
        assert run.done.wait(60) and run.state == "finished", run.error
    finally:
        daemon.close()
    assert run.summary["frames_saved"] == 10
    assert run.progress() == {"t": {"done": 2, "of": 2}, "p": {"done": 2, "of": 2}, "c": {"done": 1, "of": 1},
                              "g": {"done": 4, "of": 4}}
    rows = _rows(tmp_path / "grid" / "frames.csv")
    tiles = sorted({(round(float(r["x_um"])), round(float(r["y_um"]))) for r in rows if r["p"] == "0"})
    half = round(fov_um / 2)
    assert tiles == sorted([(-half, half), (half, half), (half, -half), (-half, -half)])
    assert {(round(float(r["x_um"])), float(r["z_um"])) for r in rows if r["p"] == "1"} == {(2000, 2.0)}
    assert len(list((tmp_path / "grid" / "frames").glob("*.ome.tif"))) == 5  # 4 tiles + 1 position
