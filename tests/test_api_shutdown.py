"""`smartscope serve` as a real process: SIGTERM/SIGINT stop the run and leave complete files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import tifffile
import yaml

TOKEN = "shutdown-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_gracefully_on_signal(config, tmp_path, sig):
    config.inference.workers = 0
    config.storage.root = str(tmp_path / "data")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smartscope", "serve", "--config", str(cfg), "--port", str(port)],
                            env={**os.environ, "SMARTSCOPE_TOKEN": TOKEN}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "serve did not come up"
            time.sleep(0.1)
        r = httpx.post(base + "/acquisitions", json={"frames": 2000, "name": "run"},
                       headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201
        while httpx.get(base + "/status").json().get("frames_acquired", 0) < 30:
            time.sleep(0.05)
        t0 = time.perf_counter()
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        print(f"{sig.name}: exited in {time.perf_counter() - t0:.2f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert TOKEN not in out
    run = tmp_path / "data" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["state"] == "cancelled" and 30 <= summary["frames_saved"] == summary["frames_acquired"] < 2000
    stack = tifffile.imread(run / "frames.ome.tif")
    assert stack.shape == (summary["frames_saved"], 64, 64)
    assert len((run / "frames.csv").read_text().splitlines()) == summary["frames_saved"] + 1
    assert (run / "report.png").is_file()
    assert "lasers safe" in out
