"""Append-only decision log: one JSON line per decision, flushed as written."""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path
from typing import Any


class DecisionLog:
    """Writes to `path` (if given) and keeps the most recent entries for the API."""

    def __init__(self, path: Path | None = None, keep: int = 1000) -> None:
        self._lock = threading.Lock()
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._fh = None
        self.count = 0
        self.set_file(path)

    def set_file(self, path: Path | None) -> None:
        """Send further entries to `path` (appending), or to memory only."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115

    def append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=float)
        with self._lock:
            if self._fh is not None:
                self._fh.write(line + "\n")
                self._fh.flush()
            self._recent.append(entry)
            self.count += 1

    def recent(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Newest last; `offset` counts back from the newest."""
        with self._lock:
            items = list(self._recent)
        end = len(items) - offset
        return items[max(0, end - limit) : max(0, end)]

    def close(self) -> None:
        self.set_file(None)
