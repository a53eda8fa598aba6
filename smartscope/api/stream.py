"""`/stream`: a WebSocket of per-frame summaries and decisions, decimated on the server.

Each message is one JSON object (see `STREAM_MESSAGE_DOC`). The server sends at
most `max_rate_hz` messages per second: frame summaries are decimated (the
newest wins, `skipped_frames` says how many were not sent), decisions never
are (every decision since the previous message rides along). The first message
goes out at once, with the current state, so a client knows where it stands.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

if TYPE_CHECKING:
    from smartscope.service import Daemon

STREAM_MESSAGE_DOC = """\
`ws://HOST:PORT/stream?max_rate_hz=10[&token=TOKEN]` (the token, or an
`Authorization: Bearer` header, only when reads are protected). Messages, JSON:
`{"type": "update", "t_s", "state", "acquisition", "frames_acquired",
"frame": {acquisition, frame, t_capture_s, n_emitters, event_score, focus_nm,
latency_ms, activation_mw, excitation_mw, z_um, interval_ms, angle_deg} | null,
"skipped_frames", "decisions": [...]}`, at most `max_rate_hz` (≤ 100) a second."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class StreamCursor:
    """What one client has seen; `next_message` gives what is new since, or None."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._results = daemon.results_seen
        self._decisions = daemon.decisions.count
        self._state: str | None = None

    def next_message(self, first: bool = False) -> dict[str, Any] | None:
        d = self._daemon
        results, n_decisions = d.results_seen, d.decisions.count
        new_results, new_decisions = results - self._results, n_decisions - self._decisions
        self._results, self._decisions = results, n_decisions
        run = d.run
        state = run.state if run is not None else "idle"
        frame = d.latest if (new_results > 0 or first) else None
        decisions = d.decisions.recent(min(new_decisions, 1000)) if new_decisions > 0 else []
        if not first and frame is None and not decisions and state == self._state:
            return None
        self._state = state
        return {"type": "update", "t_s": time.time(), "state": state,
                "acquisition": run.id if run is not None else None,
                "frames_acquired": run.counts.acquired if run is not None else 0,
                "frame": frame, "skipped_frames": max(new_results - 1, 0), "decisions": decisions}


async def serve_stream(websocket: WebSocket, daemon: Daemon, max_rate_hz: float) -> None:
    """Send updates until the client goes away; at most max_rate_hz messages a second."""
    await websocket.accept()
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def listener() -> None:  # called from the daemon's threads
        loop.call_soon_threadsafe(changed.set)

    async def until_disconnect() -> None:
        try:
            while True:
                if (await websocket.receive())["type"] == "websocket.disconnect":
                    return
        except (WebSocketDisconnect, RuntimeError):
            return

    period_s = 1.0 / max_rate_hz
    cursor = StreamCursor(daemon)
    daemon.subscribe(listener)
    gone = asyncio.create_task(until_disconnect())
    try:
        await websocket.send_text(json.dumps(cursor.next_message(first=True), default=_jsonable))
        next_send = loop.time() + period_s
        while not gone.done():
            waiter = asyncio.create_task(changed.wait())
            await asyncio.wait({waiter, gone}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if gone.done():
                break
            if (delay := next_send - loop.time()) > 0:
                await asyncio.sleep(delay)  # decimation: what arrives meanwhile is folded in
            changed.clear()
            message = cursor.next_message()
            if message is None:
                continue
            await websocket.send_text(json.dumps(message, default=_jsonable))
            next_send = loop.time() + period_s
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client left mid-send
    finally:
        daemon.unsubscribe(listener)
        gone.cancel()
