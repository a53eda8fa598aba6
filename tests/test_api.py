"""The control API served by uvicorn on loopback: auth, validation, nothing half-applied."""

from __future__ import annotations

import csv
import io
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import tifffile
import uvicorn
from conftest import small_config
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from smartscope.api import create_app
from smartscope.config import Range
from smartscope.service import Daemon

TOKEN = "s3cret-token"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@contextmanager
def serve(app, **uvicorn_kw):
    """uvicorn on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", **uvicorn_kw}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(5)


@contextmanager
def served_daemon_with_a_worker(storage_root):
    """The simulated microscope with one real worker, its API on loopback: (base URL, client, daemon). The
    activation starts far too low, so the illumination policy has work to do and decisions flow."""
    config = small_config()
    config.acquisition.activation_mw = 2.0
    config.storage.root = str(storage_root)
    daemon = Daemon(config)
    try:
        daemon.spawn_workers(1)
        daemon.wait_for_workers(1)
        with serve(create_app(daemon, token=TOKEN)) as base, httpx.Client(base_url=base, timeout=30) as client:
            yield base, client, daemon
    finally:
        daemon.close()


def make_daemon(config, tmp_path) -> Daemon:
    config.inference.workers = 0
    config.storage.root = str(tmp_path / "data")
    return Daemon(config)


@pytest.fixture
def api(config, tmp_path):
    daemon = make_daemon(config, tmp_path)
    with serve(create_app(daemon, token=TOKEN)) as base, httpx.Client(base_url=base, timeout=30) as client:
        yield client, daemon
    daemon.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG = {"Authorization": "Bearer nope"}


def power(daemon) -> float:
    return float(daemon.core.getProperty("ActivationLaser", "Power_mW"))


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/acquisitions", {"frames": 5}),
    ("POST", "/acquisitions/current/stop", None),
    ("PUT", "/devices/ActivationLaser/properties/Power_mW", {"value": 10}),
    ("PATCH", "/policies/illumination", {"enabled": False}),
    ("POST", "/acquisitions/current/pause", None),
    ("POST", "/acquisitions/current/resume", None),
    ("POST", "/acquisitions", {"sequence": {"time_plan": {"interval": 0.02, "loops": 5}}}),
])
def test_writes_need_the_token_and_change_nothing(api, method, path, body):
    client, daemon = api
    run = daemon.start_acquisition(None, 500)  # something a stop/pause/resume could change
    if path.endswith("resume"):
        daemon.pause_acquisition()

    def state():
        return (power(daemon), daemon.engine.slots["illumination"].enabled, len(daemon.runs), run.state,
                daemon.core.mda.is_paused(), run.stop.is_set())

    before = state()
    assert client.request(method, path, json=body).status_code == 401
    assert client.request(method, path, json=body, headers=WRONG).status_code == 403
    assert state() == before


def test_reads_are_open_and_health(api):
    client, _ = api
    assert client.get("/health").json() == {"status": "ok"}
    st = client.get("/status").json()
    assert st["state"] == "idle" and st["actuators"]["activation_mw"] == 0.0
    devices = client.get("/devices").json()
    assert devices["ActivationLaser"]["properties"]["Power_mW"]["limits"] == [0.0, 300.0]


def test_device_set_checks_limits_and_envelope(api):
    client, daemon = api
    r = client.put("/devices/ActivationLaser/properties/Power_mW", json={"value": 500}, headers=AUTH)
    assert r.status_code == 422 and "[0.0, 300.0]" in r.json()["detail"]
    assert power(daemon) == 0.0
    r = client.put("/devices/ActivationLaser/properties/Power_mW", json={"value": 42.5}, headers=AUTH)
    assert r.status_code == 200 and power(daemon) == 42.5
    assert daemon.actuator.snapshot()["activation_mw"] == 42.5  # went through the actuator door
    assert client.put("/devices/Nope/properties/X", json={"value": 1}, headers=AUTH).status_code == 404


def test_policy_update_validated_atomically(api):
    client, daemon = api
    r = client.patch("/policies/frame_rate", json={"params": {"upper": 0.1, "lower": 0.9}}, headers=AUTH)
    assert r.status_code == 422
    assert daemon.engine.slots["frame_rate"].policy.params.upper == 0.8
    r = client.patch("/policies/illumination", json={"enabled": False, "params": {"set_point_emitters": 20}},
                     headers=AUTH)
    assert r.status_code == 200 and r.json()["params"]["set_point_emitters"] == 20 and not r.json()["enabled"]
    assert client.patch("/policies/nope", json={}, headers=AUTH).status_code == 404


def test_acquisition_lifecycle_and_conflict(api):
    client, daemon = api
    assert client.post("/acquisitions", json={"frames": -3}, headers=AUTH).status_code == 422
    assert client.post("/acquisitions", json={"frames": 5, "name": "../etc"}, headers=AUTH).status_code == 422
    r = client.post("/acquisitions", json={"frames": 3000, "name": "run1"}, headers=AUTH)
    assert r.status_code == 201
    run_id = r.json()["id"]
    r2 = client.post("/acquisitions", json={"frames": 5}, headers=AUTH)
    assert r2.status_code == 409 and r2.json()["detail"]["running"] == run_id
    stopped = client.post("/acquisitions/current/stop", headers=AUTH).json()
    assert stopped["state"] == "cancelled" and stopped["frames_acquired"] > 0
    got = client.get(f"/acquisitions/{run_id}").json()
    assert got["summary"]["frames_saved"] == got["frames_acquired"]
    assert client.get("/acquisitions/unknown").status_code == 404


def wait_done(daemon, timeout_s: float = 30) -> None:
    assert daemon.run.done.wait(timeout_s)


def test_same_folder_twice_is_refused(api):
    client, daemon = api
    assert client.post("/acquisitions", json={"frames": 3, "name": "cell"}, headers=AUTH).status_code == 201
    wait_done(daemon)
    r = client.post("/acquisitions", json={"frames": 3, "name": "cell"}, headers=AUTH)
    assert r.status_code == 409 and "already holds" in r.json()["detail"]
    assert len(daemon.runs) == 1


def test_pause_resume_loses_no_frame(api):
    client, daemon = api
    assert client.post("/acquisitions/current/pause", headers=AUTH).status_code == 404
    r = client.post("/acquisitions", json={"frames": 60, "name": "p"}, headers=AUTH)
    assert r.status_code == 201 and r.json()["state"] == "acquiring"
    time.sleep(0.2)
    paused = client.post("/acquisitions/current/pause", headers=AUTH).json()
    assert paused["state"] == "paused" and 0 < paused["frames_acquired"] < 60
    assert daemon.actuator.snapshot()["activation_mw"] == 0.0  # lasers safe while paused
    assert not daemon.core.isSequenceRunning()
    time.sleep(0.3)
    assert client.get(f"/acquisitions/{paused['id']}").json()["frames_acquired"] == paused["frames_acquired"]
    assert client.post("/acquisitions/current/pause", headers=AUTH).status_code == 409
    resumed = client.post("/acquisitions/current/resume", headers=AUTH).json()
    assert resumed["state"] == "acquiring" and resumed["pauses"] == 1
    assert daemon.actuator.snapshot()["activation_mw"] == 20.0  # restored
    assert client.post("/acquisitions/current/resume", headers=AUTH).status_code == 409
    wait_done(daemon)
    done = client.get(f"/acquisitions/{paused['id']}").json()
    s = done["summary"]
    assert done["state"] == "finished" and s["frames_acquired"] == s["frames_saved"] == 60 and s["pauses"] == 1
    stack = tifffile.imread(done["files"]["frames"])
    assert stack.shape == (60, 64, 64)
    with open(done["files"]["frame_states"], newline="") as fh:
        frames = [int(row["frame"]) for row in csv.DictReader(fh)]
    assert frames == list(range(60))
    outcomes = [d["outcome"] for d in client.get("/decisions").json()]
    assert outcomes.count("paused") == outcomes.count("resumed") == 1


@pytest.mark.parametrize("interval_s", [0.02, 0])
def test_sequence_time_plan(api, interval_s):
    """A time plan; interval 0 is "as fast as the camera goes" (the exposure, 10 ms here), not an envelope breach."""
    client, daemon = api
    seq = {"time_plan": {"interval": interval_s, "loops": 15}}
    r = client.post("/acquisitions", json={"sequence": seq, "name": "seq"}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["frames_requested"] == 15 and r.json()["interval_ms"] == interval_s * 1000
    wait_done(daemon)
    s = client.get(f"/acquisitions/{r.json()['id']}").json()["summary"]
    assert s["frames_saved"] == 15 and s["interval_ms"] == interval_s * 1000 and s["sequence"] == seq
    with open(daemon.storage_root / "seq" / "frames.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {float(row["interval_ms"]) for row in rows} == {interval_s * 1000}
    period_ms = np.median(np.diff([float(row["t_s"]) for row in rows])) * 1000
    assert period_ms == pytest.approx(max(interval_s * 1000, daemon.core.getExposure()), rel=0.2)


@pytest.mark.parametrize(("body", "message"), [
    ({"sequence": {"time_plan": {"interval": 0.02, "loops": 5}, "z_plan": {"range": 100, "step": 10}}},
     "outside the safety envelope [-20, 20] (safety.z_um)"),
    ({"sequence": {"channels": ["DAPI"]}}, "sequence.channels[0].config: 'DAPI' is not a preset of 'Channel'"),
    ({"sequence": {"channels": [{"group": "Objective", "config": "SMLM"}]}},
     "sequence.channels[0].group: 'Objective' is not the channel group 'Channel'"),
    ({"sequence": {"stage_positions": [{"x": 0, "y": 0}, {"x": 5000, "y": 0}]}},
     "x = 5000 µm at (p=1) is outside the stage limits [-100, 100] (safety.stage_x_um)"),
    ({"sequence": {}}, "the plan has no axis"),
    ({"sequence": {"time_plan": {"interval": 0.001, "loops": 5}}}, "safety envelope"),
    ({"sequence": {"time_plan": {"interval": 0.02, "loops": 5}}, "frames": 5}, "not both"),
    ({"sequence": {"time_plan": {"interval": -1, "loops": 5}}}, "interval"),
])
def test_bad_plans_are_refused_naming_the_field_before_anything_moves(api, body, message):
    client, daemon = api
    daemon.config.safety.stage_x_um = Range(min=-100, max=100)
    xy_before = daemon.core.getXYPosition()
    r = client.post("/acquisitions", json=body, headers=AUTH)
    assert r.status_code == 422 and message in r.text, r.text
    assert not daemon.runs and daemon.core.getXYPosition() == xy_before


def test_latest_frame_png_and_results(api):
    client, daemon = api
    for path in ("/frames/latest.png", "/results/latest"):
        r = client.get(path)
        assert r.status_code == 404 and "POST /acquisitions" in r.json()["detail"]
    client.post("/acquisitions", json={"frames": 10}, headers=AUTH)
    wait_done(daemon)
    r = client.get("/frames/latest.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:8] == PNG_MAGIC
    assert r.headers["x-frame"] == "9"
    img = np.asarray(Image.open(io.BytesIO(r.content)))
    assert img.shape == (64, 64) and img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    r = client.get("/frames/latest.png", params={"low_percentile": 0, "high_percentile": 100})
    assert r.status_code == 200
    assert client.get("/frames/latest.png", params={"high_percentile": 120}).status_code == 422
    assert client.get("/results/latest").status_code == 404  # no worker ran: frames, but no results


def _metrics(client) -> dict[tuple[str, tuple], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_prometheus_text(api):
    client, daemon = api
    m = _metrics(client)
    assert m[("smartscope_frames_acquired_total", ())] == 0
    assert m[("smartscope_acquisition_state", (("state", "idle"),))] == 1
    client.post("/acquisitions", json={"frames": 12}, headers=AUTH)
    wait_done(daemon)
    client.put("/devices/ActivationLaser/properties/Power_mW", json={"value": 5}, headers=AUTH)
    m = _metrics(client)
    assert m[("smartscope_frames_acquired_total", ())] == m[("smartscope_frames_saved_total", ())] == 12
    assert m[("smartscope_frames_inferred_total", ())] == 0
    assert m[("smartscope_frames_dropped_total", ())] == 12  # no worker connected: nothing could be sent
    assert m[("smartscope_frames_lost_total", ())] == m[("smartscope_frames_skipped_total", ())] == 0
    assert m[("smartscope_actuator_moves_total", (("actuator", "activation_mw"), ("source", "api")))] == 1
    assert m[("smartscope_inference_latency_seconds_count", ())] == 0
    assert m[("smartscope_inference_latency_seconds_bucket", (("le", "+Inf"),))] == 0
    assert m[("smartscope_acquisition_state", (("state", "finished"),))] == 1
    assert m[("smartscope_actuator_value", (("actuator", "activation_mw"),))] == 5
    assert not any(name == "smartscope_workers" for name, _ in m)  # no worker: no provider sample


def test_cors_closed_by_default_and_allowlist(config, tmp_path):
    daemon = make_daemon(config, tmp_path)
    preflight = {"Origin": "http://lab.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization"}
    try:
        with serve(create_app(daemon, token=TOKEN)) as base:
            r = httpx.get(base + "/status", headers={"Origin": "http://lab.example"})
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
            r = httpx.options(base + "/acquisitions", headers=preflight)
            assert "access-control-allow-origin" not in r.headers
        with serve(create_app(daemon, token=TOKEN, cors_origins=["http://lab.example"])) as base:
            r = httpx.options(base + "/acquisitions", headers=preflight)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://lab.example"
            r = httpx.options(base + "/acquisitions", headers={**preflight, "Origin": "http://evil.example"})
            assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    finally:
        daemon.close()


def test_request_body_limit(api):
    client, daemon = api
    big = {"frames": 5, "name": "x" * 10, "pad": "y" * 2_000_000}
    r = client.post("/acquisitions", json=big, headers=AUTH)
    assert r.status_code == 413 and "1000000 bytes" in r.json()["detail"]

    def chunks():
        yield b'{"frames": 5, "name": "'
        for _ in range(30):
            yield b"z" * 50_000
        yield b'"}'

    r = client.post("/acquisitions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert not daemon.runs
    ok = client.post("/acquisitions", content=iter([b'{"frames": 3}']), headers={**AUTH, "Content-Type":
                                                                                  "application/json"})
    assert ok.status_code == 201  # a small chunked body still gets through


def test_protected_reads_and_stream_need_the_token(config, tmp_path):
    daemon = make_daemon(config, tmp_path)
    try:
        with serve(create_app(daemon, token=TOKEN, protect_reads=True)) as base:
            for path in ("/status", "/metrics", "/acquisitions", "/results/latest", "/frames/latest.png",
                         "/devices", "/policies", "/decisions"):
                assert httpx.get(base + path).status_code == 401, path
                assert httpx.get(base + path, headers=WRONG).status_code == 403, path
            assert httpx.get(base + "/health").status_code == 200
            assert httpx.get(base + "/status", headers=AUTH).status_code == 200
            ws = base.replace("http", "ws") + "/stream"
            for url, headers, code in ((ws, {}, 401), (ws + "?token=nope", {}, 403), (ws, WRONG, 403)):
                with pytest.raises(InvalidStatus) as e:
                    connect(url, additional_headers=headers, open_timeout=5)
                assert e.value.response.status_code == code
            for url, headers in ((ws + f"?token={TOKEN}", {}), (ws, AUTH)):
                with connect(url, additional_headers=headers, open_timeout=5) as conn:
                    assert json.loads(conn.recv(timeout=5))["state"] == "idle"
    finally:
        daemon.close()


def test_tokens_never_logged(config, tmp_path):
    daemon = make_daemon(config, tmp_path)
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    try:
        with serve(create_app(daemon, token=TOKEN, protect_reads=True), log_level="info") as base:
            for name in ("uvicorn.access", "uvicorn.error"):
                logging.getLogger(name).addHandler(handler)
            httpx.get(base + f"/status?token={TOKEN}")
            httpx.get(base + "/status", headers=AUTH)
            with connect(base.replace("http", "ws") + f"/stream?token={TOKEN}", open_timeout=5) as conn:
                conn.recv(timeout=5)
            time.sleep(0.1)
    finally:
        for name in ("uvicorn.access", "uvicorn.error"):
            logging.getLogger(name).removeHandler(handler)
        daemon.close()
    assert any("/status" in r for r in records) and any("/stream" in r for r in records)
    assert not any(TOKEN in r for r in records)
    assert any("token=***" in r for r in records)


def test_acquisition_chooses_which_policies_run(api):
    client, daemon = api
    before = {n: s.enabled for n, s in daemon.engine.slots.items()}
    r = client.post("/acquisitions", json={"frames": 5, "policies": ["focus", "nope"]}, headers=AUTH)
    assert r.status_code == 422 and "nope" in r.text
    assert {n: s.enabled for n, s in daemon.engine.slots.items()} == before and not daemon.runs
    r = client.post("/acquisitions", json={"frames": 5, "policies": ["focus"]}, headers=AUTH)
    assert r.status_code == 201
    enabled = {p["name"]: p["enabled"] for p in client.get("/policies").json()}
    assert enabled == {name: name == "focus" for name in before}
    assert daemon.runs[r.json()["id"]].done.wait(30)
    assert client.get(f"/acquisitions/{r.json()['id']}").json()["summary"]["policies_enabled"] == ["focus"]


def test_only_this_host_and_its_pages_reach_the_api(api):
    """DNS rebinding and cross-site pages: a request naming another host is refused (400) before any route,
    a WebSocket from another site's page (its Origin) is refused (403); this host's own pages connect."""
    client, daemon = api
    assert client.get("/status", headers={"Host": "evil.example"}).status_code == 400
    r = client.post("/acquisitions", json={"frames": 5}, headers={**AUTH, "Host": "rebound.example:8000"})
    assert r.status_code == 400 and daemon.run is None
    ws = str(client.base_url).replace("http", "ws") + "/stream"
    with pytest.raises(InvalidStatus) as refused:
        connect(ws, additional_headers={"Origin": "https://evil.example"}, open_timeout=5)
    assert refused.value.response.status_code == 403
    with connect(ws, additional_headers={"Origin": str(client.base_url)}, open_timeout=5) as conn:
        assert json.loads(conn.recv(timeout=5))["state"] == "idle"


def test_booleans_are_booleans(api):
    client, daemon = api
    for not_a_bool in (0, 1, "false", "yes"):
        r = client.patch("/policies/illumination", json={"enabled": not_a_bool}, headers=AUTH)
        assert r.status_code == 422, not_a_bool
    assert daemon.engine.slots["illumination"].enabled


@pytest.mark.parametrize(("sequence", "where"), [
    ({"stage_positions": {"plate": {"rows": 1000, "columns": 1000, "well_spacing": 9}, "a1_center_xy": [0, 0]}},
     "sequence.stage_positions.plate"),
    ({"stage_positions": [{"x": 1, "y": 1}, {"x": 2, "y": 2, "sequence": {"stage_positions": {
        "plate": {"rows": 127077476, "columns": 136951106, "well_spacing": 9}, "a1_center_xy": [0, 0]}}}]},
     "sequence.stage_positions[1].sequence.stage_positions.plate"),
])
def test_a_plate_of_millions_of_wells_is_refused_before_it_is_expanded(api, sequence, where):
    """A few bytes asking for 10⁶–10¹⁶ wells (useq would allocate them while validating the body; fuzzing
    found the nested one at 124 PiB): 422 naming where, nothing allocated, nothing started."""
    client, daemon = api
    rss_before_mb = int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6
    r = client.post("/acquisitions", json={"sequence": sequence}, headers=AUTH)
    assert r.status_code == 422 and f"{where}: " in r.text and "at most 1536" in r.text
    assert int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6 - rss_before_mb < 50
    assert daemon.run is None
