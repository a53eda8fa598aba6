"""The benchmark runner: options checked against each benchmark, the GPU plan refusing a machine without one."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from smartscope.bench import run_benchmark


def test_the_gpu_benchmarks_refuse_to_run_without_a_gpu_and_options_are_checked(tmp_path, capsys):
    """On a machine without CUDA, `bench gpu` says so and runs nothing (no CPU figure passes as a GPU one);
    an option a benchmark does not take is refused by name."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the GPU benchmarks would run")
    report = run_benchmark("gpu", tmp_path / "gpu.json", provider="cuda")
    assert report["results"]["benchmarks"] == {} and "CUDAExecutionProvider does not load" in report["results"]["error"]
    assert json.loads((tmp_path / "gpu.json").read_text())["results"]["available_providers"] == \
        ort.get_available_providers()
    with pytest.raises(ValueError, match="--world does not apply to the gpu benchmark"):
        run_benchmark("gpu", None, world="independent")


@pytest.mark.slow
def test_the_variants_bench_scores_every_variant_on_both_worlds_against_one_bound(tmp_path):
    """`bench variants --quick --world independent` end to end (it once broke when `bench localization`'s held-out
    world grew a row): every shipped variant scored beside its fp32 parent on our simulator and on the held-out PSF,
    against bounds with the camera's read noise (above the Poisson-only one), and timed."""
    results = run_benchmark("variants", tmp_path / "v.json", quick=True, world="independent")["results"]
    assert set(results["parents"]) == {"localization", "localization-w8"}
    for parent, entry in results["parents"].items():
        models = {parent, f"{parent}-fp16", f"{parent}-int8"}  # every parent has both variants shipped
        for world in ("simulator", "independent"):
            for photons, level in entry[world]["isolated"].items():
                assert models <= set(level), (world, photons)
                assert all(0.5 < level[m]["rmse_over_crlb"] < 3 for m in models)
        held_out = entry["independent"]["isolated"]["500"]
        assert held_out["crlb_x_nm"] > held_out["crlb_x_nm_poisson_only"]
    assert all(ms > 0 for ms in results["speed_ms"].values())


@pytest.mark.slow
def test_the_frame_rate_bench_runs_the_policy_on_the_model_it_is_given(tmp_path):
    """`bench frame_rate --quick --seeds 1 [--model PATH]`: seed 0's 60 s run has 2 events, both imaged fast on
    the shipped model's score (measured: 2 of 2); the same model with a card whose switch threshold is 1.0 (a
    probability never reaches it) never switches, so no event time is imaged fast."""
    from smartscope.resources import resolve_model_path

    shipped = run_benchmark("frame_rate", tmp_path / "fr.json", quick=True, seeds=1)["results"]
    assert shipped["model"] == "events.onnx" and [row["seed"] for row in shipped["seeds"]] == [0]
    assert shipped["events"] == 2 and shipped["events_imaged_fast"] == 2
    onnx = resolve_model_path("events.onnx")
    card = json.loads(onnx.with_suffix(".json").read_text())
    (tmp_path / "events.onnx").write_bytes(onnx.read_bytes())
    (tmp_path / "events.json").write_text(json.dumps({**card, "switch_threshold": 1.0}))
    never = run_benchmark("frame_rate", None, quick=True, seeds=1, model=str(tmp_path / "events.onnx"))["results"]
    assert never["events"] == 2 and never["events_imaged_fast"] == 0
    assert never["fast_fraction_of_event_time_median"] == 0.0
    assert json.loads((tmp_path / "fr.json").read_text())["results"]["seeds"][0]["events"] == 2


@pytest.mark.slow
def test_the_held_out_localization_world_scores_the_psfs_outside_the_training_family():
    """`bench localization --world independent`'s held-out part on a few frames: the default pupil PSF and every
    one of OTHER_PUPILS (two scalar pupils outside the training family's ranges, one vectorial) get a Jaccard
    for every method, on frames where the shipped localizer finds most emitters; the variants bench skips them."""
    from smartscope.bench.localization import OTHER_PUPILS, independent_world, ours_method
    from smartscope.simulation import CameraConfig

    camera = CameraConfig()
    method, _ = ours_method(camera)
    out = independent_world({"smartscope": (method, [])}, {"smartscope": {"threshold": 0.3}}, camera, n_dense=3, n_iso=4)
    assert set(out["other_pupils"]) == set(OTHER_PUPILS) and len(OTHER_PUPILS) == 3
    assert any(params.get("vectorial") for params in OTHER_PUPILS.values())
    for label, scores in out["other_pupils"].items():
        assert 0.5 < scores["smartscope"]["jaccard"] <= 1.0, label
    assert 0.5 < out["dense"]["smartscope"]["jaccard"] <= 1.0
    skipped = independent_world({"smartscope": (method, [])}, {"smartscope": {"threshold": 0.3}}, camera, n_dense=3,
                                n_iso=4, other_pupils=False)
    assert skipped["other_pupils"] == {}
