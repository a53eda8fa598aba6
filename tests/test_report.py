"""The run report, drawn from the files of a real short run (simulated microscope, a real worker)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import small_config

from smartscope.report import REPORT_COLUMNS, NotARunError, write_report
from smartscope.service import Daemon

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    config = small_config()
    config.acquisition.activation_mw = 2.0  # the illumination policy has work to do
    out = tmp_path_factory.mktemp("report") / "run"
    daemon = Daemon(config)
    try:
        daemon.spawn_workers(1)
        daemon.wait_for_workers(1)
        run = daemon.start_acquisition(out, 80)
        assert run.done.wait(60)
    finally:
        daemon.close()
    return out, run.summary


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_run_ends_with_a_report(finished_run):
    out, summary = finished_run
    png = (out / "report.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    rows = _rows(out / "report.csv")
    assert list(rows[0]) == list(REPORT_COLUMNS)
    assert [int(r["frame"]) for r in rows] == list(range(summary["frames_saved"])) and len(rows) == 80
    assert float(rows[0]["t_s"]) == 0 and float(rows[-1]["t_s"]) > 0.5  # 80 frames at 10 ms
    inferred = [r for r in rows if r["n_emitters"]]
    assert len(inferred) == summary["frames_inferred"] + summary["frames_inferred_catch_up"] == 80
    live = [r for r in inferred if r["latency_ms"]]  # catch-up rows after the run: no latency, no set point
    assert len(live) == summary["frames_inferred"] >= 20
    assert all(float(r["set_point_emitters"]) == 12 for r in live)  # the demo config's set point
    assert all(float(r["latency_ms"]) > 0 for r in live)
    # every move of the activation laser in the decision log is marked on its frame
    moves = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    moves = [d for d in moves if d.get("actuator") == "activation_mw" and d["outcome"] in ("applied", "clamped")]
    marked = [r for r in rows if "activation_mw" in r["decisions"].split(";")]
    assert len(moves) >= 1 and len(marked) == len({d["frame"] for d in moves})
    # the focus estimate is the median localization z of each frame
    locs = _rows(out / "localizations.csv")
    frame = int(inferred[0]["frame"])
    z = [float(r["z [nm]"]) for r in locs if int(r["frame"]) == frame]
    assert float(inferred[0]["focus_nm"]) == pytest.approx(np.median(z), abs=0.01)


def test_smartscope_report_redraws_a_finished_run(finished_run, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.png").unlink()
    (copy / "report.csv").unlink()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "smartscope", "report", str(copy)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    print(f"smartscope report: {time.perf_counter() - t0:.2f} s")
    assert json.loads(r.stdout)["report"] == str(copy / "report.png")
    assert (copy / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert (copy / "report.csv").read_text() == (out / "report.csv").read_text()


def test_report_of_a_run_from_before_inference_csv(finished_run, tmp_path):
    """Emitters counted from localizations.csv when inference.csv is missing."""
    out, _ = finished_run
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    (copy / "inference.csv").unlink()
    write_report(copy)
    rows = _rows(copy / "report.csv")
    locs = _rows(out / "localizations.csv")
    assert sum(float(r["n_emitters"]) for r in rows) == len(locs)


def test_not_a_run_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NotARunError, match="not a finished smartscope run: no frames.csv or summary.json"):
        write_report(tmp_path)
    r = subprocess.run([sys.executable, "-m", "smartscope", "report", str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "is not a folder" in r.stderr and "Traceback" not in r.stderr
