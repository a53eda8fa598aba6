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
