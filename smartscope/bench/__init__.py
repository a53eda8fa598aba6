"""Benchmarks that print numbers and write JSON: `smartscope bench NAME [--json OUT]`.

Each benchmark is a module `smartscope.bench.<name>` with a function
`run(quick: bool = False) -> dict` that prints a readable table as it goes and
returns the numbers (written as JSON by the CLI). Timings on shared machines
are noisy: benchmarks report medians over repeats and ratios measured in the
same run.
"""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import time
from pathlib import Path
from typing import Any

BENCHMARKS = ("acquisition", "transport", "latency", "simulation", "localization", "counting", "events", "policies",
              "frame_rate", "analyze", "soak", "variants", "tiling", "storage", "gpu")


def run_benchmark(name: str, json_out: Path | None = None, quick: bool = False, **options: Any) -> dict[str, Any]:
    """Run one benchmark; `options` (e.g. world="independent") go to its run() where given."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"smartscope.bench.{name}")
    takes = inspect.signature(module.run).parameters
    if unknown := [option for option in options if option not in takes]:
        raise ValueError(f"--{unknown[0]} does not apply to the {name} benchmark")
    t0 = time.time()
    results = module.run(quick=quick, **options)
    report = {"benchmark": name, "quick": quick, "machine": {"python": platform.python_version(),
              "processor": platform.processor() or platform.machine()},
              "seconds": round(time.time() - t0, 2), **options, "results": results}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {json_out}")
    return report
