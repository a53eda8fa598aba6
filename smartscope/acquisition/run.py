"""One acquisition's record: its plan, counters, result tables, latency statistics and summary.

`AcquisitionRun` is what the API and the CLI read about a run. It owns the two
tables written as results arrive (localizations.csv, inference.csv) and the
lock that keeps a late result out of closed files, so counters and files never
disagree. `summarize` is summary.json: the run plus the daemon's view of the
workers, the policies and the sockets at that moment.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smartscope.acquisition.handler import FrameCounts
from smartscope.storage import LocalizationWriter
from smartscope.storage.frames import frames_on_disk
from smartscope.transport.protocol import INDEX_AXES

if TYPE_CHECKING:
    from smartscope.acquisition.handler import FrameHandler
    from smartscope.acquisition.plan import CheckedPlan
    from smartscope.control.engine import PolicyEngine
    from smartscope.storage import FrameWriter
    from smartscope.transport.protocol import Result

RUN_STATES = ("acquiring", "paused", "finishing", "finished", "cancelled", "errored", "interrupted")
#: what an interrupted run's summary says happened
INTERRUPTED = ("the daemon ended during the run (killed, crashed or power lost): the counts are what is on disk; "
               "frames.csv lists every frame saved, up to the frames in flight")
#: per-frame inference record written next to the data (the report reads it)
INFERENCE_COLUMNS = ("frame", *INDEX_AXES, "t_capture_s", "t_result_s", "latency_ms", "n_emitters", "emitter_count",
                     "focus_nm", "event_score", "background_photons", "set_point_emitters", "worker", "path")
#: inference.csv `path`: the frame's result came live, or from the catch-up after the run (acquisition/catch_up.py)
LIVE, CATCH_UP = "live", "catch_up"
LATENCY_WINDOW = 100_000  # the most recent frames whose latencies the summary's percentiles cover
#: the result tables reach the disk at least this often: the live SR image reads them, and a crash loses no more
TABLE_FLUSH_S = 0.5
#: where a frame's capture → result latency goes (per-stage percentiles in the summary):
#: queue: capture → sent to a worker (the wait in the publisher's mailbox for a free one); transfer: → taken
#: off the socket by a worker; pre / inference / post: the worker's own; return: → the daemon has it.
#: transfer and return compare two hosts' clocks when the worker runs elsewhere.
LATENCY_STAGES = ("queue", "transfer", "pre", "inference", "post", "return")


class Window:
    """The last `size` values (ms) in a float32 ring: 4 bytes a frame and bounded, where a deque of Python
    floats costs 32 bytes a frame (a run of days at 100 frames/s must not grow the daemon)."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._values = np.empty(size, dtype=np.float32)
        self._n = 0

    def append(self, value: float) -> None:
        self._values[self._n % len(self._values)] = value
        self._n += 1

    def values(self) -> np.ndarray:
        return self._values[:min(self._n, len(self._values))]

    def __len__(self) -> int:
        return min(self._n, len(self._values))


def _percentiles(window: Window) -> dict[str, float | None]:
    if not len(window):
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(window.values(), [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


@dataclass
class AcquisitionRun:
    id: str
    n_frames: int
    out_dir: Path
    state: str = "acquiring"  # one of RUN_STATES
    exposure_ms: float | None = None
    interval_ms: float | None = None
    sequence: dict[str, Any] | None = None  # the MDASequence it was started with (JSON)
    plan: CheckedPlan | None = None
    handler: FrameHandler | None = None
    bursts: bool = False  # runs as hardware-sequenced bursts (a pause stops the camera at once)
    inferred: int = 0
    skipped: int = 0  # frames workers conflated away (reported by sequence number)
    catch_up_seqs: set[int] = field(default_factory=set)  # frames offered again after the run (catch_up.py)
    inferred_catch_up: int = 0  # ... and answered (counted apart from the live path's `inferred`)
    catch_up: dict[str, Any] | None = None  # what the catch-up offered, and why not all, for the summary
    localizations: int = 0
    # capture → result latency of the most recent frames (bounded: a run may last days)
    latencies_ms: Window = field(default_factory=Window)
    stages_ms: dict[str, Window] = field(default_factory=lambda: {s: Window() for s in LATENCY_STAGES})
    decisions_at_start: int = 0
    started_s: float = field(default_factory=time.time)
    finished_s: float | None = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    pauses: int = 0
    resumed_s: float | None = None
    saved_lasers: dict[str, float | None] = field(default_factory=dict)  # laser powers before a pause
    inference_at_start: bool = True  # a worker was live at start: the lasers go safe while inference is lost
    lasers_before_hold: dict[str, float | None] = field(default_factory=dict)  # ... before inference was lost
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    writer: FrameWriter | None = None
    locs: LocalizationWriter | None = None
    inference_fh: Any = None
    files_closed: bool = False  # set under `lock` when the writers close: late results are ignored
    inference_csv: Any = None
    summary: dict[str, Any] | None = None
    report_error: str | None = None
    _tables_flushed_s: float = 0.0

    def latency_percentiles(self) -> dict[str, float | None]:
        return _percentiles(self.latencies_ms)

    @property
    def counts(self) -> FrameCounts:
        if self.handler is not None:
            return self.handler.counts
        s = self.summary or {}  # a run of an earlier daemon (load_run)
        return FrameCounts(acquired=s.get("frames_acquired", 0), published=s.get("frames_published", 0),
                           dropped_inference=s.get("frames_not_sent", 0))

    @property
    def frames_saved(self) -> int:
        return self.writer.saved if self.writer is not None else int((self.summary or {}).get("frames_saved", 0))

    def progress(self) -> dict[str, dict[str, int]]:
        """Per axis of the plan: the highest index reached + 1, of the axis' size."""
        reached = self.handler.reached if self.handler is not None else {}
        sizes = self.plan.sizes if self.plan is not None else {}
        return {axis: {"done": reached.get(axis, -1) + 1, "of": n} for axis, n in sizes.items()}

    def open_tables(self) -> None:
        """localizations.csv and inference.csv, filled by `record` as results arrive."""
        self.locs = LocalizationWriter(self.out_dir / "localizations.csv")
        self.inference_fh = open(self.out_dir / "inference.csv", "w", newline="", encoding="utf-8")  # noqa: SIM115
        self.inference_csv = csv.writer(self.inference_fh)
        self.inference_csv.writerow(INFERENCE_COLUMNS)

    def count_skipped(self, skipped: list[tuple[str, int]]) -> int:
        """Count this run's frames in a worker's (acquisition, seq) list of frames it skipped; returns how
        many of them were not frames awaiting an answer (never sent, or answered already)."""
        with self.lock:
            if self.files_closed:
                return 0
            mine = [seq for acquisition, seq in skipped if acquisition == self.id and seq not in self.catch_up_seqs]
            answered = sum(self.handler.awaiting.take(seq) for seq in mine)
            self.skipped += answered
            return len(mine) - answered

    def record(self, r: Result, locs: np.ndarray, focus_nm: float | None, latency_ms: float, now_s: float,
               set_point: float | None) -> bool | None:
        """Count one frame's result and write its rows; False (nothing done) once the files are closed, None
        (rejected) for a frame that is not awaiting a result: never sent, or answered already."""
        with self.lock:
            if self.files_closed or self.locs is None:
                return False
            if not self.handler.awaiting.take(r.seq):
                return None
            live = r.seq not in self.catch_up_seqs
            self.inferred += live
            self.inferred_catch_up += not live
            self.localizations += len(locs)
            if live:
                self.latencies_ms.append(latency_ms)
            if live and r.stages is not None and r.header.t_sent_s is not None:
                st = r.stages
                for name, value_ms in zip(LATENCY_STAGES, (
                        (r.header.t_sent_s - r.t_capture_s) * 1000, (st.t_received_s - r.header.t_sent_s) * 1000,
                        st.pre_ms, st.infer_ms, st.post_ms, (now_s - r.t_done_s) * 1000), strict=True):
                    self.stages_ms[name].append(value_ms)
            self.locs.write(r.seq, locs, r.background_photons)
            self.inference_csv.writerow([
                r.seq, *r.header.index.values(), f"{r.t_capture_s:.6f}", f"{now_s:.6f}",
                f"{latency_ms:.3f}" if live else "", r.n_emitters,  # a catch-up result's age measures nothing
                "" if r.count_estimate is None else r.count_estimate,
                "" if focus_nm is None else f"{focus_nm:.2f}", "" if r.event_score is None else f"{r.event_score:.4f}",
                "" if r.background_photons is None else f"{r.background_photons:.3f}",
                "" if set_point is None or not live else set_point, r.worker_id, LIVE if live else CATCH_UP])
            if now_s - self._tables_flushed_s > TABLE_FLUSH_S:
                self._flush_tables(now_s)
        return True

    def flush_tables(self) -> None:
        with self.lock:
            if not self.files_closed and self.locs is not None:
                self._flush_tables(time.time())

    def _flush_tables(self, now_s: float) -> None:
        self.locs.flush()
        self.inference_fh.flush()
        self._tables_flushed_s = now_s

    def expect_catch_up(self, seq: int) -> None:
        """Frame `seq` is offered again after the run: its result is taken once, and counted apart."""
        with self.lock:
            self.catch_up_seqs.add(seq)
            self.handler.awaiting.add(seq)

    @property
    def lost(self) -> int:
        """Published frames with neither a result nor a worker's skip: acquired = inferred + skipped + not sent
        + lost (the one definition the summary, the API and /metrics use)."""
        return self.counts.published - self.inferred - self.skipped

    def files(self) -> dict[str, str]:
        """The run folder's files by role (the report's two once it is drawn, summary.json once finished)."""
        names = (("frames", self.writer.path.name if self.writer else "frames.ome.tif"), ("frame_states", "frames.csv"),
                 ("localizations", "localizations.csv"), ("decisions", "decisions.jsonl"),
                 ("inference", "inference.csv"), ("report", "report.png"), ("report_data", "report.csv"),
                 ("summary", "summary.json"))
        return {role: str(self.out_dir / name) for role, name in names}

    def keep_record_only(self) -> None:
        """After summary.json is written: drop what only the running run and its file needed (the plan and the
        sequence, up to the API's body limit each), so the daemon can list thousands of runs. The summary in
        memory keeps everything but the sequence (summary.json has it)."""
        if self.plan is not None:
            self.plan = dataclasses.replace(self.plan, sequence=None)
        self.sequence = None
        if self.summary is not None:
            self.summary = {k: v for k, v in self.summary.items() if k != "sequence"}

    def close_files(self, outcome: str, summarize: Callable[[AcquisitionRun], dict[str, Any]]) -> None:
        """Close every file (later results are ignored), then settle the state and take the summary.

        A frame writer that fails to close makes the run errored.
        """
        try:  # the frames first, outside the lock: a long flush does not hold up the results thread
            self.writer.close()
        except RuntimeError as e:
            self.error, outcome = self.error or str(e), "errored"
        with self.lock:
            self.files_closed = True
            try:
                self.locs.close()
                self.inference_fh.close()
            except OSError as e:
                self.error, outcome = self.error or f"closing the tables failed: {e}", "errored"
            self.finished_s = time.time()
            self.state = outcome
            self.summary = summarize(self)
            # what only a running run needs goes: the daemon keeps every run's record for its whole life
            self.latencies_ms, self.stages_ms = Window(1), {name: Window(1) for name in LATENCY_STAGES}
            self.locs = self.inference_fh = self.inference_csv = None
            if self.handler is not None:
                self.handler.awaiting.clear()


def summarize(run: AcquisitionRun, *, workers: dict[str, dict[str, Any]], engine: PolicyEngine,
              decisions_total: int, malformed_results: dict[str, int],
              frame_ring: dict[str, Any] | None) -> dict[str, Any]:
    """The run's summary (summary.json, /status): `workers` as `WorkerPool.status` gives them."""
    duration = (run.finished_s or time.time()) - run.started_s
    providers = sorted({w["provider"] for w in workers.values()})
    malformed_frames: Counter[str] = Counter()
    for w in workers.values():
        malformed_frames.update(w["malformed_frames"])
    return {
        "acquisition": run.id,
        "state": run.state,
        "error": run.error,
        "frames_requested": run.n_frames,
        "progress": run.progress(),
        "exposure_ms": run.exposure_ms,
        "interval_ms": run.interval_ms,
        "sequence": run.sequence,
        "pauses": run.pauses,
        "frames_acquired": run.counts.acquired,
        "frames_saved": run.frames_saved,
        # the memory unsaved frames held at most, and the frames whose hand-off to storage made the camera wait
        "frames_pending_storage_peak_mb": round(run.writer.peak_pending_bytes / 1e6, 1) if run.writer else None,
        "frames_waited_for_storage": run.writer.puts_waited if run.writer else None,
        "frames_published": run.counts.published,
        "frames_inferred": run.inferred,
        "frames_inferred_catch_up": run.inferred_catch_up,
        "catch_up": run.catch_up,
        "frames_dropped_inference": run.counts.acquired - run.inferred,
        "frames_not_sent": run.counts.dropped_inference,
        "frames_skipped_by_workers": run.skipped,
        "frames_lost": run.lost,
        "localizations": run.localizations,
        "latency_ms": run.latency_percentiles(),
        "latency_stages_ms": {name: _percentiles(v) for name, v in run.stages_ms.items()},
        "started_s": run.started_s,
        "duration_s": round(duration, 3),
        "inference_rate_hz": round(run.inferred / duration, 2) if duration > 0 else None,
        "provider": providers[0] if len(providers) == 1 else providers,
        "workers": sum(w["state"] == "active" for w in workers.values()),
        "actions": {name: engine.actions.get(name, 0) for name in engine.slots},
        "policies_enabled": [name for name, slot in engine.slots.items() if slot.enabled],
        "decisions": decisions_total - run.decisions_at_start,
        "malformed_frames": dict(malformed_frames),
        "malformed_results": malformed_results,
        "frame_ring": frame_ring,
        "policies": {name: {"enabled": slot.enabled, "params": slot.policy.params.model_dump()}
                     for name, slot in engine.slots.items()},
        "files": run.files(),
    }


def _data_rows(path: Path) -> tuple[int, list[str] | None, list[str] | None]:
    """(rows after the header, first row, last complete row) of a CSV table; (0, None, None) if missing."""
    if not path.is_file():
        return 0, None, None
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        n, first, last = 0, None, None
        for row in reader:
            if header is not None and len(row) == len(header):  # a row cut by the crash is not counted
                n, first, last = n + 1, first or row, row
    return n, first, last


def load_run(out_dir: Path) -> AcquisitionRun | None:
    """A run folder of an earlier daemon as a run record: its summary.json, or, for a run the daemon did not
    live to finish (no summary.json), what is on disk, marked `interrupted` (and its summary.json written,
    so `smartscope report` works on it). None if the folder holds no run."""
    import json

    out_dir = Path(out_dir)
    if not (out_dir / "frames.csv").is_file():
        return None
    try:
        summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if summary is None:
        saved, first, last = _data_rows(out_dir / "frames.csv")
        inferred = _data_rows(out_dir / "inference.csv")[0]
        started_s = float(first[1]) if first else (out_dir / "frames.csv").stat().st_mtime
        finished_s = float(last[1]) if last else started_s
        tiffs = [out_dir / "frames.ome.tif"] if (out_dir / "frames.ome.tif").is_file() else \
            sorted((out_dir / "frames").glob("*.ome.tif"))
        summary = {"acquisition": out_dir.name, "state": "interrupted", "error": INTERRUPTED,
                   "frames_requested": None, "frames_acquired": saved, "frames_saved": saved,
                   "frames_on_disk": sum(frames_on_disk(t) for t in tiffs) if tiffs else None,
                   "frames_inferred": inferred, "localizations": _data_rows(out_dir / "localizations.csv")[0],
                   "decisions": (out_dir / "decisions.jsonl").read_bytes().count(b"\n")
                   if (out_dir / "decisions.jsonl").is_file() else 0,
                   "started_s": started_s, "duration_s": round(finished_s - started_s, 3)}
        logging.getLogger("smartscope").warning(
            "acquisition in %s was interrupted (the daemon ended during it): %d frames on disk", out_dir, saved)
        with contextlib.suppress(OSError):  # listed all the same; the next start tries again
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    started_s = float(summary.get("started_s") or (out_dir / "frames.csv").stat().st_mtime)
    run = AcquisitionRun(id=str(summary.get("acquisition") or out_dir.name),
                         n_frames=int(summary.get("frames_requested") or summary.get("frames_saved") or 0),
                         out_dir=out_dir, state=str(summary.get("state", "interrupted")),
                         exposure_ms=summary.get("exposure_ms"), interval_ms=summary.get("interval_ms"),
                         sequence=summary.get("sequence"), inferred=int(summary.get("frames_inferred") or 0),
                         localizations=int(summary.get("localizations") or 0), started_s=started_s,
                         finished_s=started_s + float(summary.get("duration_s") or 0), error=summary.get("error"),
                         files_closed=True, summary=summary)
    run.done.set()
    return run
