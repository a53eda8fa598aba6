"""The control API served by uvicorn on loopback: auth, validation, nothing half-applied."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from smartscope.api import create_app
from smartscope.service import Daemon

TOKEN = "s3cret-token"


@pytest.fixture
def api(config, tmp_path):
    config.inference.workers = 0
    config.storage.root = str(tmp_path / "data")
    daemon = Daemon(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(daemon, token=TOKEN), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    client = httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30)
    yield client, daemon
    client.close()
    server.should_exit = True
    thread.join(5)
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
])
def test_writes_need_the_token_and_change_nothing(api, method, path, body):
    client, daemon = api
    before = (power(daemon), daemon.engine.slots["illumination"].enabled, len(daemon.runs))
    assert client.request(method, path, json=body).status_code == 401
    assert client.request(method, path, json=body, headers=WRONG).status_code == 403
    assert (power(daemon), daemon.engine.slots["illumination"].enabled, len(daemon.runs)) == before


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
    r = client.post("/acquisitions", json={"frames": 100000, "name": "run1"}, headers=AUTH)
    assert r.status_code == 201
    run_id = r.json()["id"]
    r2 = client.post("/acquisitions", json={"frames": 5}, headers=AUTH)
    assert r2.status_code == 409 and r2.json()["detail"]["running"] == run_id
    stopped = client.post("/acquisitions/current/stop", headers=AUTH).json()
    assert stopped["state"] == "cancelled" and stopped["frames_acquired"] > 0
    got = client.get(f"/acquisitions/{run_id}").json()
    assert got["summary"]["frames_saved"] == got["frames_acquired"]
    assert client.get("/acquisitions/unknown").status_code == 404
