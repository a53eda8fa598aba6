"""After a run: the frames the live stream did not infer go to the workers from the run's files.

Live, a frame that finds every worker busy is replaced by the next one (fresh,
not queued: transport/sockets.py), so a camera faster than inference leaves
frames without localizations. Once the run has ended by itself, its frames
are on disk: this reads back each frame that has no result (frames.csv
minus inference.csv, of the channel the models read), builds its header
from its row in frames.csv (its MDA index and the state at capture), and
offers it to the workers one at a time without replacing any (`offer`),
so localizations.csv ends up covering every frame. Results come back on the
ordinary path; the run counts them apart (`frames_inferred_catch_up`) and
they steer nothing (the run is no longer acquiring, the lasers are safe).

It reads a run stored as one stack whose frames are in the order taken (a
time-lapse, in either format); other layouts are left to `smartscope
analyze`, which localizes any run's files, and the summary says so.
"""

from __future__ import annotations

import csv
import logging
import time
from typing import TYPE_CHECKING

from smartscope.analysis.sources import discover, read_frames
from smartscope.transport.protocol import INDEX_AXES, STATE_FIELDS, FrameHeader

if TYPE_CHECKING:
    from collections.abc import Callable

    from smartscope.acquisition.run import AcquisitionRun
    from smartscope.transport.protocol import CameraParams
    from smartscope.transport.sockets import FramePublisher

log = logging.getLogger("smartscope")
OFFER_TIMEOUT_S = 30.0  # no worker took a frame for this long: the catch-up ends there


def frames_without_result(run: AcquisitionRun, infer_channel: str | None) -> list[dict[str, str]]:
    """frames.csv rows (in the order taken) of frames the models read that have no row in inference.csv."""
    run.flush_tables()
    with open(run.out_dir / "inference.csv", newline="", encoding="utf-8") as fh:
        inferred = {int(row["frame"]) for row in csv.DictReader(fh)}
    with open(run.out_dir / "frames.csv", newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if int(row["frame"]) not in inferred
                and (infer_channel is None or row["channel"] in ("", infer_channel))]


def catch_up(run: AcquisitionRun, publisher: FramePublisher, camera: CameraParams, *, infer_channel: str | None,
             workers_alive: Callable[[], bool], abandon: Callable[[], bool]) -> dict:
    """Offer every frame of the run without a result to the workers; returns what was offered (and why not,
    if nothing was). The caller waits for the results as for the live ones."""
    rows = frames_without_result(run, infer_channel)
    if not rows:
        return {"frames_offered": 0, "not_done": None}
    stacks = discover([run.out_dir])
    if len(stacks) != 1 or stacks[0].n_frames != run.frames_saved:
        return {"frames_offered": 0, "not_done": f"{len(rows)} frames: a multi-file or multi-dimensional layout "
                f"({len(stacks)} stacks); `smartscope analyze {run.out_dir}` localizes every frame"}
    (stack,) = stacks
    offered, t0 = 0, time.time()
    log.info("acquisition %s: catching up %d frames the live stream did not infer", run.id, len(rows))
    for row in rows:
        if abandon() or not workers_alive():
            break
        seq = int(row["frame"])
        frame = read_frames(stack, seq, seq + 1)[0]
        state = {k: float(row[k]) if row.get(k) not in (None, "") else None for k in STATE_FIELDS}
        header = FrameHeader(acquisition=run.id, seq=seq, t_capture_s=float(row["t_s"]), shape=frame.shape,
                             dtype=str(frame.dtype), exposure_ms=float(row["exposure_ms"] or 0.0), camera=camera,
                             **{axis: int(row[axis]) for axis in INDEX_AXES}, **state)
        run.expect_catch_up(seq)
        if not publisher.offer(header, frame, OFFER_TIMEOUT_S):
            run.handler.awaiting.take(seq)
            break
        offered += 1
    not_done = None if offered == len(rows) else f"{len(rows) - offered} frames not offered (stopped, or no worker)"
    log.info("acquisition %s: %d of %d frames offered for catch-up in %.1f s", run.id, offered, len(rows),
             time.time() - t0)
    return {"frames_offered": offered, "not_done": not_done}
