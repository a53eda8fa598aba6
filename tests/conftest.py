from __future__ import annotations

import math
import tempfile

import pytest

from smartscope.config import SmartscopeConfig, load_config

_KEYS_DIR = tempfile.mkdtemp(prefix="smartscope-test-keys-") + "/keys"  # made by the first daemon, shared


def small_config() -> SmartscopeConfig:
    """The shipped demo config on private ports, small and fast (module-scoped fixtures call it too)."""
    cfg = load_config()
    cfg.transport.frames_address = "tcp://127.0.0.1:0"
    cfg.transport.results_address = "tcp://127.0.0.1:0"
    cfg.simulation.camera.width_px = cfg.simulation.camera.height_px = 64
    cfg.acquisition.exposure_ms = cfg.acquisition.interval_ms = 10
    cfg.inference.require_workers = False  # most tests drive the acquisition alone; tests/test_faults.py does not
    cfg.transport.keys_dir = _KEYS_DIR
    return cfg


def first_event_window_frame(card: dict, interval_ms: float) -> int:
    """The index of the first frame the event model scores, frames coming every interval_ms
    from 0: the worker's EventWindow takes a keyframe at 0 and then at the first frame
    window_spacing_ms after the last, and scores from the frame after its min_window_frames − 1 keyframes
    (a card without that field: its frames − 1), or from the first frame where min_window_frames is 1."""
    frames_per_keyframe = math.ceil(card["window_spacing_ms"] / interval_ms - 1e-9)
    needed = int(card.get("min_window_frames", card["frames"]))
    return 0 if needed == 1 else (needed - 2) * frames_per_keyframe + 1


@pytest.fixture
def config() -> SmartscopeConfig:
    return small_config()
