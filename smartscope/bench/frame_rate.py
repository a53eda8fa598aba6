"""The frame-rate policy on an event model's score, over many seeds: what
every candidate event model was judged by before it could ship
(models/README.md, events). `smartscope bench frame_rate [--seeds N]
[--model PATH]` runs `scenarios.frame_rate_scenario(seed, duration_s=200,
score="model")` for seeds 0..N-1 (default 18) with the shipped events.onnx
or a candidate (an ONNX path with its card beside it), the switch where
that model's card puts it, as the daemon sets it. Nine 200 s seeds move by a
few events between models whose cards are alike; 18 tell them apart better.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from smartscope import scenarios

SEEDS = 18
DURATION_S = 200.0
PER_SEED = ("fast_fraction_of_event_time", "dose_vs_always_fast", "median_switch_delay_s", "events",
            "events_imaged_fast")


def run(quick: bool = False, seeds: int | None = None, model: str | None = None) -> dict[str, Any]:
    """Seeds 0..seeds-1, each a 200 s live run (quick: 2 seeds of 60 s); medians over the seeds and
    the events imaged fast over all of them."""
    n_seeds = seeds or (2 if quick else SEEDS)
    duration_s = 60.0 if quick else DURATION_S
    model = model or "events.onnx"
    print(f"frame-rate policy on {model}'s score, {n_seeds} seeds x {duration_s:g} s")
    print(f"{'seed':>4} {'event time fast':>15} {'events fast':>11} {'dose':>6} {'switch delay s':>14} {'s':>5}")
    rows = []
    for seed in range(n_seeds):
        t0 = time.perf_counter()
        r = scenarios.frame_rate_scenario(seed, duration_s=duration_s, score="model", model=model)
        rows.append({"seed": seed, **{k: r[k] for k in PER_SEED}})
        fast, delay = r["fast_fraction_of_event_time"], r["median_switch_delay_s"]
        print(f"{seed:>4} {'-' if fast is None else f'{fast:.3f}':>15} "
              f"{r['events_imaged_fast']:>5} of {r['events']:<3} "
              f"{r['dose_vs_always_fast']:>6.3f} {'-' if delay is None else f'{delay:.2f}':>14} "
              f"{time.perf_counter() - t0:>5.0f}", flush=True)

    def median(key: str) -> float | None:
        values = [row[key] for row in rows if row[key] is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {"fast_fraction_of_event_time_median": median("fast_fraction_of_event_time"),
               "events_imaged_fast": sum(row["events_imaged_fast"] for row in rows),
               "events": sum(row["events"] for row in rows),
               "dose_vs_always_fast_median": median("dose_vs_always_fast"),
               "median_switch_delay_s_median": median("median_switch_delay_s")}
    print(f"median event time imaged fast {summary['fast_fraction_of_event_time_median']}, "
          f"{summary['events_imaged_fast']} of {summary['events']} events imaged fast, "
          f"median dose {summary['dose_vs_always_fast_median']} of always fast")
    return {"model": model, "duration_s": duration_s, "seeds": rows, **summary}
