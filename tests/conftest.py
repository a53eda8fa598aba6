from __future__ import annotations

import pytest

from smartscope.config import SmartscopeConfig, load_config


def small_config() -> SmartscopeConfig:
    """The shipped demo config on private ports, small and fast (module-scoped fixtures call it too)."""
    cfg = load_config()
    cfg.transport.frames_address = "tcp://127.0.0.1:0"
    cfg.transport.results_address = "tcp://127.0.0.1:0"
    cfg.simulation.camera.width_px = cfg.simulation.camera.height_px = 64
    cfg.acquisition.exposure_ms = cfg.acquisition.interval_ms = 10
    return cfg


@pytest.fixture
def config() -> SmartscopeConfig:
    return small_config()
