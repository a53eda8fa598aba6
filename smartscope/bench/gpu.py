"""Every GPU benchmark in one run, within 10 minutes: `smartscope bench gpu [--provider cuda] --json OUT`.

For a GPU machine lent for a few minutes: what the execution provider loads
and the device, then the benchmarks that run on it, each in its own process
with its own time limit (a hang in one costs only its share), each one's
JSON written to the working folder (bench-gpu.<name>.json) as soon as it
ends. On the device machine: `cd $OUT && smartscope bench gpu --json gpu.json`.
- `latency --quick --provider P`: the live loop's capture → result, 96² to
  2048², workers on the GPU;
- `tiling --quick` on P: whole frame against tiles;
- `variants` on P where the bench takes a provider (fp16 is a GPU format).
Nothing here claims a figure: the JSON files are the figures, from the
machine that ran them. On a machine without the provider it says so and
stops (nothing falls back to the CPU unnoticed).
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

from smartscope.inference.session import GPU_PROVIDERS

#: (benchmark, options, seconds allowed): 9 minutes in all
PLAN = (("latency", 300), ("tiling", 90), ("variants", 150))


def _device() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "no nvidia-smi output"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable ({e})"


def _takes_provider(name: str) -> bool:
    import importlib

    return "provider" in inspect.signature(importlib.import_module(f"smartscope.bench.{name}").run).parameters


def run(quick: bool = False, provider: str = "cuda") -> dict:
    """Each benchmark runs in its quick form whatever `quick` says (the plan fits 10 minutes)."""
    available = ort.get_available_providers()
    results: dict = {"provider": provider, "available_providers": available, "device": _device(), "benchmarks": {}}
    print(f"providers: {available}\ndevice: {results['device']}")
    if GPU_PROVIDERS[provider] not in available:
        results["error"] = f"{GPU_PROVIDERS[provider]} does not load here: install smartscope[gpu] on a GPU machine"
        print(f"error: {results['error']}")
        return results
    for name, limit_s in PLAN:
        if not _takes_provider(name):
            results["benchmarks"][name] = {"skipped": "this benchmark has no provider option"}
            continue
        out = Path(f"bench-gpu.{name}.json")
        args = [sys.executable, "-m", "smartscope", "bench", name, "--json", str(out), "--provider", provider,
                "--quick"]
        print(f"\n== {' '.join(args[3:])} (up to {limit_s} s)", flush=True)
        t0 = time.time()
        try:
            rc = subprocess.run(args, timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        entry = {"rc": rc, "seconds": round(time.time() - t0, 1), "json": str(out)}
        if out.is_file():
            entry["results"] = json.loads(out.read_text())["results"]
        results["benchmarks"][name] = entry
    return results
