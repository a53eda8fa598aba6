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


def _operation_test(op, base: str, seen: collections.Counter, daemon):
    name = f"{op.method.upper()} {op.path}"

    def before() -> None:  # the state in which the operation can succeed, so generation reaches 2xx too
        run = daemon.run
        running = run is not None and not run.done.is_set()
        if name in ("POST /acquisitions/current/pause", "POST /acquisitions/current/resume",
                    "POST /acquisitions/current/stop") and not running:
            daemon.start_acquisition(None, 300)
        if name == "POST /acquisitions/current/resume" and daemon.run.state == "acquiring":
            daemon.pause_acquisition()

    strategy = op.as_strategy()
    if name == "POST /acquisitions":
        strategy = strategy.map(_cheap)
    examples = 3 if name.startswith("POST /acquisitions/current/") else MAX_EXAMPLES  # no parameters

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
            daemon.stop_acquisition()  # the next case may start one too

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
                                                              collections.Counter()), daemon)
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
