"""schemathesis against the running API: generated requests (bounded), zero 5xx, every response
matching the OpenAPI schema. Writes carry the token (the daemon is a throwaway on the simulation)."""

from __future__ import annotations

import collections
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_api import AUTH, TOKEN, make_daemon, serve

from smartscope.api import create_app

MAX_EXAMPLES = 20  # per operation
# Not checked: "schema-valid request rejected". Some refusals depend on the configuration or the
# state, which a static schema cannot express (the safety envelope's limits, a useq sequence with a
# z plan, a second acquisition while one runs); each still has to be a documented 4xx with a Problem.


def _cheap(case):
    """Keep a generated acquisition short: storage pads a cancelled OME-TIFF series to its declared
    length (10 M frames would be 80 GB of zeros), and a 10 s exposure makes every stop slow."""
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("frames"), int) and body["frames"] > 200:
            body["frames"] = 200
        if isinstance(body.get("exposure_ms"), (int, float)) and body["exposure_ms"] > 50:
            body["exposure_ms"] = 50
        plan = body.get("sequence", {}).get("time_plan") if isinstance(body.get("sequence"), dict) else None
        if isinstance(plan, dict):
            if isinstance(plan.get("loops"), int) and plan["loops"] > 200:
                plan["loops"] = 200
            if "interval" in plan and "duration" in plan and "loops" not in plan:
                del plan["duration"]  # interval + duration can also mean millions of frames
                plan["loops"] = 200
    return case


def _in_process(daemon):
    """(before, stop) hooks on a daemon in this process."""

    def before(name: str) -> None:  # the state in which the operation can succeed, so generation reaches 2xx too
        run = daemon.run
        running = run is not None and not run.done.is_set()
        if name in ("POST /acquisitions/current/pause", "POST /acquisitions/current/resume",
                    "POST /acquisitions/current/stop") and not running:
            daemon.start_acquisition(None, 300)
        if name == "POST /acquisitions/current/resume" and daemon.run.state == "acquiring":
            daemon.pause_acquisition()

    return before, daemon.stop_acquisition


def _operation_test(op, base: str, seen: collections.Counter, hooks, max_examples: int = MAX_EXAMPLES):
    name = f"{op.method.upper()} {op.path}"
    before_hook, stop = hooks

    def before() -> None:
        before_hook(name)

    strategy = op.as_strategy()
    if name == "POST /acquisitions":
        strategy = strategy.map(_cheap)
    examples = 3 if name.startswith("POST /acquisitions/current/") else max_examples  # no parameters

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case):
        before()
        # stop waits up to 10 s for the run to end (results drained, files closed, report drawn): on a
        # loaded 2-core machine that can reach schemathesis' default timeout of 10 s
        response = case.call_and_validate(base_url=base, headers=AUTH, excluded_checks=[positive_data_acceptance],
                                          timeout=30)
        seen[response.status_code] += 1
        if name == "POST /acquisitions" and response.status_code == 201:
            stop()  # the next case may start one too

    return check


@pytest.fixture
def live_api(config, tmp_path):
    config.acquisition.exposure_ms = config.acquisition.interval_ms = 20
    daemon = make_daemon(config, tmp_path)
    try:
        with serve(create_app(daemon, token=TOKEN)) as base:
            yield base, daemon
    finally:
        daemon.close()


def test_generated_requests_get_no_5xx_and_match_the_schema(live_api):
    base, daemon = live_api
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    statuses: dict[str, collections.Counter] = {}
    t0 = time.perf_counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    for op in operations:
        check = _operation_test(op, base, statuses.setdefault(f"{op.method.upper()} {op.path}",
                                                              collections.Counter()), _in_process(daemon))
        check()
        daemon.stop_acquisition()  # an acquisition a case started must not outlive its operation
    elapsed = time.perf_counter() - t0
    print(f"schemathesis: {sum(sum(c.values()) for c in statuses.values())} requests over "
          f"{len(statuses)} operations in {elapsed:.1f} s")
    assert not [k for k, c in statuses.items() if any(code >= 500 for code in c)]
    for op in ("POST /acquisitions", "PATCH /policies/{name}",
               "POST /acquisitions/current/pause", "POST /acquisitions/current/resume",
               "GET /policies/{name}", "GET /frames/latest.png"):
        assert statuses[op][200] + statuses[op][201] >= 1, op  # generation reached the happy path too


# -- the daemon as a lab runs it: `smartscope serve`, fuzzed at length -------------------------------------

CASES_GOAL = 5000


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_the_serving_daemon_survives_5000_generated_requests(tmp_path):
    """`smartscope serve` on loopback with its worker, every operation fuzzed with the token (>= 5000 cases):
    no 5xx, no response outside the schema, the daemon alive throughout and its RSS under 500 MB."""
    import json
    import os
    import subprocess
    import sys
    import threading

    import httpx
    import yaml

    from smartscope.config import load_config

    cfg = load_config().model_dump(mode="json")
    cfg["simulation"]["camera"]["width_px"] = cfg["simulation"]["camera"]["height_px"] = 64
    cfg["acquisition"]["exposure_ms"] = cfg["acquisition"]["interval_ms"] = 20
    cfg["transport"].update(frames_address="tcp://127.0.0.1:0", results_address="tcp://127.0.0.1:0",
                            keys_dir=str(tmp_path / "keys"))
    cfg["storage"]["root"] = str(tmp_path / "data")
    cfg["storage"]["reserve_mb"] = 0
    cfg["storage"]["max_pending_mb"] = 64  # frames waiting for the disk: part of the 500 MB the daemon may hold
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    port = 18000 + os.getpid() % 1000
    daemon = subprocess.Popen([sys.executable, "-m", "smartscope", "serve", "--config", str(tmp_path / "c.yaml"),
                               "--port", str(port)], env={**os.environ, "SMARTSCOPE_TOKEN": TOKEN},
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    base = f"http://127.0.0.1:{port}"
    rss_mb: list[float] = []
    peak_mb_by_operation: collections.Counter = collections.Counter()
    current = ["start-up"]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2) and daemon.poll() is None:
            rss_mb.append(_rss_mb(daemon.pid))
            peak_mb_by_operation[current[0]] = max(peak_mb_by_operation[current[0]], round(rss_mb[-1]))
            if rss_mb[-1] > 2000:  # far over the bound: stop it before it takes the machine
                daemon.kill()

    try:
        client = httpx.Client(base_url=base, headers=AUTH, timeout=30)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if client.get("/status").json()["workers"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        threading.Thread(target=sample, daemon=True).start()

        def before(name: str) -> None:
            state = client.get("/status").json()["state"]
            running = state in ("acquiring", "paused", "finishing")
            if name in ("POST /acquisitions/current/pause", "POST /acquisitions/current/resume",
                        "POST /acquisitions/current/stop") and not running:
                client.post("/acquisitions", json={"frames": 300})
            if name == "POST /acquisitions/current/resume" and client.get("/status").json()["state"] == "acquiring":
                client.post("/acquisitions/current/pause")

        def stop() -> None:
            client.post("/acquisitions/current/stop")

        schema = schemathesis.openapi.from_url(base + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        per_operation = 3 * CASES_GOAL // (len(operations) - 3)  # hypothesis stops early where the space is small
        statuses: dict[str, collections.Counter] = {}
        t0 = time.perf_counter()
        for op in operations:
            name = current[0] = f"{op.method.upper()} {op.path}"
            print(f"fuzzing {name} (daemon RSS {rss_mb[-1] if rss_mb else 0:.0f} MB)", file=sys.stderr, flush=True)
            _operation_test(op, base, statuses.setdefault(name, collections.Counter()), (before, stop),
                            max_examples=per_operation)()
            stop()
            assert daemon.poll() is None, f"the daemon died during {name}"
        cases = sum(sum(c.values()) for c in statuses.values())
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        if daemon.poll() is not None:  # it died: say how
            print("daemon exited", daemon.returncode, "peak RSS (MB) by operation:", dict(peak_mb_by_operation),
                  (tmp_path / "serve.log").read_text()[-3000:], file=sys.stderr)
        daemon.send_signal(2)
        daemon.wait(60)
    figures = {"cases": cases, "seconds": round(elapsed, 1), "rss_mb_max": round(max(rss_mb), 1),
               "rss_mb_first": round(rss_mb[0], 1), "server_errors": sum(
                   n for c in statuses.values() for code, n in c.items() if code >= 500)}
    print("schemathesis soak:", json.dumps(figures), "peak RSS (MB) by operation:", dict(peak_mb_by_operation))
    assert cases >= CASES_GOAL and figures["server_errors"] == 0
    assert max(rss_mb) < 500, figures
    assert daemon.returncode == 0
