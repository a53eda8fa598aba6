"""Offline re-analysis: `smartscope simulate`, then `smartscope localize` and `count`, scored against the truth."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from smartscope.cli import main
from smartscope.evaluation import score
from smartscope.storage import read_localizations


def _per_frame(cols, n):
    arr = np.column_stack([cols["x [nm]"], cols["y [nm]"], cols["z [nm]"]])
    return [arr[cols["frame"] == f] for f in range(n)]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """30 frames of the simulated microscope (seed 2) and their truth, written by `smartscope simulate`."""
    out = tmp_path_factory.mktemp("simulated")
    assert main(["simulate", "--frames", "30", "--out", str(out), "--seed", "2"]) == 0
    assert tifffile.imread(out / "stack.ome.tif").shape == (30, 96, 96)
    return out


def test_simulate_then_localize_matches_the_truth(simulated, tmp_path, capsys):
    # pixel size comes from the OME metadata; camera defaults match the simulated camera
    assert main(["localize", str(simulated / "stack.ome.tif"), "--out", str(tmp_path / "locs.csv")]) == 0
    truth, locs = read_localizations(simulated / "truth.csv"), read_localizations(tmp_path / "locs.csv")
    s = score(_per_frame(truth, 30), _per_frame(locs, 30))
    assert s["recall"] > 0.8 and s["precision"] > 0.9 and s["rmse_lateral_nm"] < 40
    assert "localizing 30/30 frames" in capsys.readouterr().err


def test_count_writes_each_frames_emitters_near_the_truth(simulated, tmp_path, capsys):
    assert main(["count", str(simulated / "stack.ome.tif"), "--out", str(tmp_path / "counts.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "counts.csv", encoding="utf-8")))
    assert [int(r["frame"]) for r in rows] == list(range(30))
    assert rows[0]["emitters"] == rows[1]["emitters"] == ""  # before the model's 3-frame window is full
    counted = np.array([int(r["emitters"]) for r in rows[2:]])
    field_um2 = (96 * 0.1) ** 2
    assert np.allclose([float(r["density [/um2]"]) for r in rows[2:]], counted / field_um2, atol=1e-4)
    truth = np.bincount(read_localizations(simulated / "truth.csv")["frame"].astype(int), minlength=30)[2:]
    assert 0.85 < counted.sum() / truth.sum() < 1.15
    assert np.median(np.abs(counted - truth) / truth) < 0.25
    assert "counting 30/30 frames" in capsys.readouterr().err


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("id,frame\n"), "cannot be read as TIFF"),
    (lambda p: tifffile.imwrite(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb"), "RGB"),
    (lambda p: tifffile.imwrite(p, np.zeros((4, 16, 16), np.uint16), photometric="minisblack"), "no pixel size"),
    (lambda p: tifffile.imwrite(p, np.zeros((4, 16, 16), np.complex64), photometric="minisblack"), "not camera data"),
])
@pytest.mark.parametrize("command", ["localize", "count"])
def test_wrong_inputs_get_one_clear_error(tmp_path, make, message, command):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(SystemExit) as err:
        main([command, str(path), "--out", str(tmp_path / "o.csv")])
    assert message in str(err.value)


def test_train_refuses_too_few_steps_before_loading_torch(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "events", "--steps", "10"])
    assert err.value.code == 2
    assert "must be at least 20" in capsys.readouterr().err


@pytest.mark.parametrize("value", [0, 500, 65535])  # empty, constant, saturated everywhere
def test_count_invents_no_emitters_in_featureless_frames(tmp_path, value):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, np.full((4, 30, 30), value, np.uint16), photometric="minisblack")  # 30: not a multiple of 4
    assert main(["count", str(path), "--out", str(tmp_path / "c.csv"), "--pixel-size-nm", "100"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "c.csv", encoding="utf-8")))
    assert [r["emitters"] for r in rows] == ["", "", "0", "0"]
