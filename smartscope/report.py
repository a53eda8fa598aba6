"""The run report: `report.png` and the data behind it, `report.csv`, from a run folder.

Built only from the files an acquisition leaves (so `smartscope report DIR`
redraws it from a finished run, on any machine):

- `frames.csv`      the acquisition state stamped on every frame (time, powers, Z, interval, angle)
- `inference.csv`   per inferred frame: emitters, focus estimate, event score, latency, set point
                    (older runs without it: emitters are counted from `localizations.csv`)
- `decisions.jsonl` every policy decision (marked on the time axis, one row of ticks per actuator)
- `summary.json`    the run's identity and counts (the title)

`report.csv` has one row per frame (columns `REPORT_COLUMNS`; empty where a
frame was not inferred). Time is seconds since the first frame.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

REPORT_COLUMNS = ("frame", "t", "p", "g", "c", "z", "t_s", "exposure_ms", "interval_ms", "activation_mw",
                  "excitation_mw", "z_um", "angle_deg", "n_emitters", "set_point_emitters", "focus_nm", "event_score",
                  "latency_ms", "decisions")
# each frame's MDA index (t, p, g, c, z; empty for runs from before it was recorded) and its state at capture
_FRAME_STATE = ("t", "p", "g", "c", "z", "exposure_ms", "interval_ms", "activation_mw", "excitation_mw", "z_um",
                "angle_deg")
_INFERENCE = ("n_emitters", "set_point_emitters", "focus_nm", "event_score", "latency_ms")
#: which panel marks the decisions on which actuator
_ACTUATOR_PANEL = {"activation_mw": 1, "excitation_mw": 1, "z_um": 2, "interval_ms": 3, "angle_deg": 5}
_ACTUATOR_COLOR = {"activation_mw": "tab:purple", "excitation_mw": "tab:green", "z_um": "tab:blue",
                   "interval_ms": "tab:orange", "angle_deg": "tab:brown"}
_MOVES = ("applied", "clamped")


class NotARunError(ValueError):
    """The folder is not (or not yet) a smartscope run folder."""


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "", "None") else math.nan
    except ValueError:
        return math.nan


def _rows(path: Path) -> list[dict[str, str]]:
    """The table's complete rows (a row torn by a crash has missing fields: left out)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if None not in row.values() and None not in row]


def read_decisions(run_dir: Path) -> list[dict[str, Any]]:
    """Every decision of the run (skipping a torn last line), oldest first."""
    path = Path(run_dir) / "decisions.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def check_run_dir(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARunError(f"{run_dir} is not a folder")
    missing = [f for f in ("frames.csv", "summary.json") if not (run_dir / f).is_file()]
    if missing:
        raise NotARunError(f"{run_dir} is not a finished smartscope run: no {' or '.join(missing)} "
                           "(a run folder holds frames.ome.tif, frames.csv, localizations.csv, "
                           "decisions.jsonl, summary.json)")


def report_table(run_dir: Path, decisions: list[dict[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """One row per frame: state at capture, inference results, decisions taken on that frame.

    Returns columns `REPORT_COLUMNS` as arrays (float, NaN where unknown;
    `frame` int; `decisions` str, actuators moved on that frame joined by ';').
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    frames = _rows(run_dir / "frames.csv")
    n = len(frames)
    table: dict[str, np.ndarray] = {"frame": np.array([int(r["frame"]) for r in frames], dtype=int)}
    t_abs = np.array([_float(r.get("t_s")) for r in frames])
    t0 = t_abs[0] if n else 0.0
    table["t_s"] = t_abs - t0
    for col in _FRAME_STATE:
        table[col] = np.array([_float(r.get(col)) for r in frames])
    index = {f: i for i, f in enumerate(table["frame"])}
    for col in _INFERENCE:
        table[col] = np.full(n, math.nan)
    inference = run_dir / "inference.csv"
    if inference.is_file():
        for r in _rows(inference):
            i = index.get(int(r["frame"]))
            if i is not None:
                for col in _INFERENCE:
                    table[col][i] = _float(r.get(col))
    elif (run_dir / "localizations.csv").is_file():  # runs from before inference.csv: count localizations
        counts: dict[int, int] = {}
        zs: dict[int, list[float]] = {}
        for r in _rows(run_dir / "localizations.csv"):
            f = int(r["frame"])
            counts[f] = counts.get(f, 0) + 1
            zs.setdefault(f, []).append(_float(r.get("z [nm]")))
        table["n_emitters"] = np.array([counts.get(f, 0) for f in table["frame"]], dtype=float)
        table["focus_nm"] = np.array([np.median(zs[f]) if f in zs else math.nan for f in table["frame"]])
    moved: dict[int, list[str]] = {}
    for d in read_decisions(run_dir) if decisions is None else decisions:
        if d.get("outcome") in _MOVES and d.get("frame") is not None and d.get("actuator"):
            moved.setdefault(int(d["frame"]), []).append(d["actuator"])
    table["decisions"] = np.array([";".join(moved.get(f, [])) for f in table["frame"]], dtype=object)
    table["_t0"] = np.array([t0])
    return table


def write_table(table: dict[str, np.ndarray], path: Path) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, np.integer)):
            return str(int(v))
        return "" if not np.isfinite(v) else f"{float(v):.6g}"

    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(REPORT_COLUMNS)
        for i in range(len(table["frame"])):
            w.writerow([fmt(table[c][i]) for c in REPORT_COLUMNS])


def render(table: dict[str, np.ndarray], decisions: list[dict[str, Any]], summary: dict[str, Any],
           path: Path) -> None:
    """Draw the report figure (Agg, no display needed) to `path` (PNG)."""
    from matplotlib.figure import Figure

    t = table["t_s"]
    t0 = float(table["_t0"][0])
    fig = Figure(figsize=(11, 15), dpi=100)  # a fixed layout: constrained layout doubles the drawing time
    axes = fig.subplots(8, 1, sharex=True, height_ratios=[1.2, 1, 1, 0.8, 0.8, 0.8, 0.8, 0.7],
                        gridspec_kw={"left": 0.1, "right": 0.92, "top": 0.97, "bottom": 0.04, "hspace": 0.12})
    dot = {"marker": ".", "markersize": 2.5, "linestyle": "none"}

    ax = axes[0]
    ax.plot(t, table["n_emitters"], color="0.3", label="emitters / frame", **dot)
    if len(t) and np.isfinite(table["n_emitters"]).any():
        window = max(1, min(25, len(t) // 20))
        smooth = _running_mean(table["n_emitters"], window)
        ax.plot(t, smooth, color="k", lw=1.2, label=f"mean of {window}")
    if np.isfinite(table["set_point_emitters"]).any():
        ax.step(t, table["set_point_emitters"], where="post", color="tab:red", ls="--", lw=1.5, label="set point")
    ax.set_ylabel("emitters")
    ax.legend(loc="upper right", fontsize=8, ncols=3)

    ax = axes[1]
    ax.plot(t, table["activation_mw"], color=_ACTUATOR_COLOR["activation_mw"], label="activation")
    ax.plot(t, table["excitation_mw"], color=_ACTUATOR_COLOR["excitation_mw"], label="excitation")
    ax.set_ylabel("laser power [mW]")
    ax.legend(loc="upper right", fontsize=8, ncols=2)

    ax = axes[2]
    ax.plot(t, table["z_um"], color=_ACTUATOR_COLOR["z_um"], label="stage Z")
    ax.set_ylabel("Z [µm]", color=_ACTUATOR_COLOR["z_um"])
    twin = ax.twinx()
    twin.plot(t, table["focus_nm"], color="tab:cyan", alpha=0.8, label="defocus estimate", **dot)
    twin.set_ylabel("median loc. z [nm]", color="tab:cyan")
    if np.isfinite(table["focus_nm"]).any():
        twin.axhline(0, color="tab:cyan", lw=0.6, ls=":")

    axes[3].plot(t, table["interval_ms"], color=_ACTUATOR_COLOR["interval_ms"])
    axes[3].set_ylabel("interval [ms]")
    axes[4].plot(t, table["event_score"], color="tab:red", **dot)
    axes[4].set_ylabel("event score")
    if not np.isfinite(table["event_score"]).any():
        _note(axes[4], "no event scores (no event model ran)")
    axes[5].plot(t, table["angle_deg"], color=_ACTUATOR_COLOR["angle_deg"])
    axes[5].set_ylabel("angle [°]")
    axes[6].plot(t, table["latency_ms"], color="0.3", **dot)
    axes[6].set_ylabel("inference\nlatency [ms]")
    if not np.isfinite(table["latency_ms"]).any():
        _note(axes[6], "no inference results")

    # decisions: ticks in the actuator's own panel and one row per actuator at the bottom
    ax = axes[7]
    rows = [a for a in _ACTUATOR_PANEL if any(d.get("actuator") == a for d in decisions)]
    for k, actuator in enumerate(rows):
        times = [d["t_s"] - t0 for d in decisions if d.get("actuator") == actuator and d.get("outcome") in _MOVES]
        ax.vlines(times, k - 0.4, k + 0.4, color=_ACTUATOR_COLOR[actuator], lw=1)
        for tt in times:
            axes[_ACTUATOR_PANEL[actuator]].axvline(tt, color=_ACTUATOR_COLOR[actuator], lw=0.5, alpha=0.25)
    holds = [d["t_s"] - t0 for d in decisions if d.get("outcome") == "hold"]
    if holds:
        ax.vlines(holds, -0.5, max(len(rows), 1) - 0.5, color="tab:red", lw=1.5, label="safe hold")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_ylim(-0.6, max(len(rows), 1) - 0.4)
    ax.set_ylabel("decisions")
    if not rows:
        _note(ax, "no decisions")
    ax.set_xlabel("time since the first frame [s]")

    for start, end in _pauses(decisions, t0, float(t[-1]) if len(t) else 0.0):
        for ax in axes:
            ax.axvspan(start, end, color="0.85", alpha=0.6, lw=0)
        axes[0].text((start + end) / 2, 0.95, "paused", transform=axes[0].get_xaxis_transform(),
                     ha="center", va="top", fontsize=8, color="0.4")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    saved, requested = summary.get("frames_saved", len(t)), summary.get("frames_requested", "?")
    lat = summary.get("latency_ms") or {}
    fig.suptitle(f"smartscope run {summary.get('acquisition', '?')} · {summary.get('state', '?')} · "
                 f"{saved}/{requested} frames saved · {summary.get('frames_inferred', 0)} inferred · "
                 f"latency p50 {lat.get('p50')} ms · {summary.get('provider') or 'no worker'}", fontsize=10)
    fig.savefig(path, format="png")


def _pauses(decisions: list[dict[str, Any]], t0: float, t_end: float) -> list[tuple[float, float]]:
    """(start, end) seconds of each pause, from the paused/resumed entries of the decision log."""
    spans, start = [], None
    for d in decisions:
        if d.get("outcome") == "paused" and start is None:
            start = d["t_s"] - t0
        elif d.get("outcome") == "resumed" and start is not None:
            spans.append((start, d["t_s"] - t0))
            start = None
    if start is not None:
        spans.append((start, max(start, t_end)))
    return spans


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.5", fontsize=9)


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean over the last `window` finite values at each frame (NaN-aware)."""
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    c_sum = np.cumsum(np.insert(v, 0, 0.0))
    c_n = np.cumsum(np.insert(finite.astype(float), 0, 0.0))
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    hi = np.arange(1, len(values) + 1)
    n = c_n[hi] - c_n[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (c_sum[hi] - c_sum[lo]) / n, np.nan)


def write_report(run_dir: Path) -> dict[str, Path]:
    """Write `report.png` and `report.csv` into the run folder; NotARunError if it is not one."""
    run_dir = Path(run_dir)
    if (run_dir / "frames.csv").is_file() and not (run_dir / "summary.json").is_file():
        from smartscope.acquisition.run import load_run

        load_run(run_dir)  # a run whose daemon ended during it: its summary.json from what is on disk
    check_run_dir(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise NotARunError(f"{run_dir / 'summary.json'} is not valid JSON: {e}") from e
    decisions = read_decisions(run_dir)
    table = report_table(run_dir, decisions)
    paths = {"report": run_dir / "report.png", "report_data": run_dir / "report.csv"}
    write_table(table, paths["report_data"])
    render(table, decisions, summary, paths["report"])
    return paths
