"""Offline re-analysis: `smartscope simulate` then `smartscope localize`, scored against the truth."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from smartscope.cli import main
from smartscope.evaluation import score
from smartscope.storage import read_localizations


def _per_frame(cols, n):
    arr = np.column_stack([cols["x [nm]"], cols["y [nm]"], cols["z [nm]"]])
    return [arr[cols["frame"] == f] for f in range(n)]


def test_simulate_then_localize_matches_the_truth(tmp_path, capsys):
    assert main(["simulate", "--frames", "30", "--out", str(tmp_path), "--seed", "2"]) == 0
    stack = tmp_path / "stack.ome.tif"
    assert tifffile.imread(stack).shape == (30, 96, 96)
    # pixel size comes from the OME metadata; camera defaults match the simulated camera
    assert main(["localize", str(stack), "--out", str(tmp_path / "locs.csv")]) == 0
    truth, locs = read_localizations(tmp_path / "truth.csv"), read_localizations(tmp_path / "locs.csv")
    s = score(_per_frame(truth, 30), _per_frame(locs, 30))
    assert s["recall"] > 0.8 and s["precision"] > 0.9 and s["rmse_lateral_nm"] < 40
    assert "localizing 30/30 frames" in capsys.readouterr().err


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("id,frame\n"), "cannot be read as TIFF"),
    (lambda p: tifffile.imwrite(p, np.zeros((16, 16, 3), np.uint8), photometric="rgb"), "RGB"),
    (lambda p: tifffile.imwrite(p, np.zeros((4, 16, 16), np.uint16), photometric="minisblack"), "no pixel size"),
    (lambda p: tifffile.imwrite(p, np.zeros((4, 16, 16), np.complex64), photometric="minisblack"), "not camera data"),
])
def test_wrong_inputs_get_one_clear_error(tmp_path, make, message):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(SystemExit) as err:
        main(["localize", str(path), "--out", str(tmp_path / "o.csv")])
    assert message in str(err.value)


def test_train_refuses_too_few_steps_before_loading_torch(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "events", "--steps", "10"])
    assert err.value.code == 2
    assert "must be at least 20" in capsys.readouterr().err
