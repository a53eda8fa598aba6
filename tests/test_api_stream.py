"""The live stream, /results/latest and /metrics against a real run: uvicorn on loopback, the
simulated microscope, a real inference worker process."""

from __future__ import annotations

import json
import threading
import time

import pytest
from test_api import AUTH, _metrics, served_daemon_with_a_worker
from websockets.sync.client import connect

FRAMES = 150  # at 10 ms: 1.5 s of acquisition


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with served_daemon_with_a_worker(tmp_path_factory.mktemp("stream")) as served:
        yield served


def _listen(url: str, out: list, ready: threading.Event, stop: threading.Event) -> None:
    with connect(url, open_timeout=10) as conn:
        ready.set()
        while not stop.is_set():
            try:
                raw = conn.recv(timeout=0.2)
            except TimeoutError:
                continue
            out.append((time.monotonic(), json.loads(raw)))


def test_stream_decimates_frames_and_carries_every_decision(live):
    base, client, daemon = live
    ws = base.replace("http://", "ws://") + "/stream"
    rates = (4, 10, 50)
    received: dict[int, list] = {r: [] for r in rates}
    stop = threading.Event()
    threads = []
    for rate in rates:
        ready = threading.Event()
        url = ws if rate == 10 else f"{ws}?max_rate_hz={rate}"  # 10 is the default
        t = threading.Thread(target=_listen, args=(url, received[rate], ready, stop), daemon=True)
        t.start()
        threads.append(t)
        assert ready.wait(10)
    decisions_before, results_before = daemon.decisions.count, daemon.results_seen
    r = client.post("/acquisitions", json={"frames": FRAMES}, headers=AUTH)
    assert r.status_code == 201
    assert daemon.run.done.wait(60)
    time.sleep(0.5)  # the last (decimated) message is at most 1/4 s behind
    stop.set()
    for t in threads:
        t.join(5)
    decisions = daemon.decisions.count - decisions_before
    results = daemon.results_seen - results_before
    assert decisions > 3 and results >= FRAMES * 0.3  # live results (frames replaced under load: not all)

    for rate, messages in received.items():
        first, rest = messages[0][1], [m for _, m in messages[1:]]
        assert first["state"] == "idle" and first["frame"] is None  # the state at connection
        sent_t = [m["t_s"] for m in rest]
        gaps = [b - a for a, b in zip(sent_t[:-1], sent_t[1:], strict=True)]
        assert min(gaps) >= 1 / rate - 0.01, (rate, min(gaps))  # the decimation bound, on the server clock
        duration = sent_t[-1] - sent_t[0]
        assert len(rest) <= rate * duration + 1
        frames = [m["frame"] for m in rest if m["frame"] is not None]
        assert frames and all(m["acquisition"] == r.json()["id"] for m in rest)
        f = frames[-1]
        assert set(f) >= {"frame", "t_capture_s", "n_emitters", "event_score", "focus_nm", "activation_mw",
                          "excitation_mw", "interval_ms", "latency_ms", "z_um", "angle_deg"}
        assert isinstance(f["n_emitters"], int) and f["interval_ms"] == 10 and f["latency_ms"] > 0
        assert [x["frame"] for x in frames] == sorted(x["frame"] for x in frames)
        # frames are decimated, accounted for: each sent summary stands for itself + the skipped ones
        assert sum(1 + m["skipped_frames"] for m in rest if m["frame"] is not None) == results
        # decisions are never decimated
        assert sum(len(m["decisions"]) for m in rest) == decisions
        assert rest[-1]["state"] == "finished"
        print(f"max_rate_hz={rate}: {len(rest)} messages in {duration:.2f} s "
              f"({len(rest) / duration:.1f}/s), {len(frames)} of {results} frame summaries sent")
    assert len(received[4]) < len(received[10]) < len(received[50])


def test_latest_result_and_metrics_after_a_run(live):
    base, client, daemon = live
    if daemon.run is None or not daemon.run.done.is_set():
        client.post("/acquisitions", json={"frames": 40}, headers=AUTH)
        assert daemon.run.done.wait(60)
    run = daemon.run
    latest = client.get("/results/latest").json()
    assert latest["acquisition"] == run.id and latest["frames_inferred"] == run.inferred
    assert len(latest["localizations"]) == latest["n_emitters"]
    assert set(latest["localizations"][0]) == {"x_nm", "y_nm", "z_nm", "photons", "uncertainty_nm", "p",
                                              "background_photons"}
    m = _metrics(client)
    runs = list(daemon.runs.values())
    assert m[("smartscope_frames_inferred_total", ())] == sum(r.inferred for r in runs)
    assert m[("smartscope_inference_latency_seconds_count", ())] == sum(r.inferred for r in runs)
    assert m[("smartscope_workers", (("provider", "CPUExecutionProvider"), ("state", "active")))] == 1
    assert sum(v for (name, _), v in m.items() if name == "smartscope_malformed_frames_total") == 0
    policy_moves = sum(v for (name, labels), v in m.items()
                       if name == "smartscope_actuator_moves_total" and ("source", "policy") in labels)
    assert policy_moves == sum(sum(r.summary["actions"].values()) for r in runs) > 0
