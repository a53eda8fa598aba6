"""Bad configs fail at start with one message that names the field."""

from __future__ import annotations

import pytest
import yaml

from smartscope.config import ConfigError, PropertyRef, load_config
from smartscope.hardware import build_core
from smartscope.inference.session import ModelError, check_fits_frames, read_card
from smartscope.resources import bundled_path


def _write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_demo_config_loads():
    cfg = load_config()
    assert cfg.hardware.mode == "simulated"
    assert [p.name for p in cfg.policies] == ["illumination", "focus", "frame_rate", "view_angle"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"safety": {"activation_mw": {"range": {"min": 10, "max": 5}}}}, "safety.activation_mw.range"),
        ({"simulation": {"camera": {"pixel_size_nm": 0}}}, "simulation.camera.pixel_size_nm"),
        ({"simulation": {"optics": {"na": 1.6}}}, "simulation.optics"),
        ({"acquisition": {"exposure_ms": -1}}, "acquisition.exposure_ms"),
        ({"acquisition": {"frames": 0}}, "acquisition.frames"),
        ({"transport": {"bogus": 1}}, "transport.bogus"),
    ],
)
def test_bad_values_name_the_field(tmp_path, data, field):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert field in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_device_label_is_refused():
    """Real Micro-Manager demo config (mm-test-adapters): a label that is not loaded."""
    config = load_config(bundled_path("configs") / "hardware-example.yaml")
    config.hardware.devices.focus = "NoSuchStage"
    with pytest.raises(ConfigError, match=r"hardware.devices.focus: device 'NoSuchStage' is not loaded"):
        build_core(config)
    config.hardware.devices.focus = "Z"
    config.hardware.devices.activation_laser = PropertyRef(label="LED", property="NoSuchProperty")
    with pytest.raises(ConfigError, match=r"activation_laser.property: device 'LED' has no property"):
        build_core(config)


def test_missing_model_is_refused():
    with pytest.raises(ModelError, match="model file not found"):
        read_card("does-not-exist.onnx")


def test_model_must_fit_the_frames():
    _, card = read_card("localization.onnx")
    check_fits_frames(card, (64, 64), 100.0)  # the trained scale fits
    with pytest.raises(ModelError, match="pixel size 160.0 nm"):
        check_fits_frames(card, (64, 64), 160.0)
    with pytest.raises(ModelError, match="smaller than the model's minimum"):
        check_fits_frames(card, (4, 64), 100.0)


@pytest.mark.parametrize(("address", "mode", "ring"), [
    ("tcp://127.0.0.1:5555", "auto", True),   # loopback: no remote worker can connect
    ("ipc:///tmp/frames", "auto", True),
    ("tcp://*:5555", "auto", False),          # remote workers may connect: plain ZeroMQ
    ("tcp://10.0.0.5:5555", "auto", False),
    ("tcp://*:5555", "on", True),
    ("ipc:///tmp/frames", "off", False),
])
def test_shared_memory_ring_only_where_every_worker_is_local(address, mode, ring):
    from smartscope.config import TransportConfig

    assert TransportConfig(frames_address=address, shared_memory=mode).ring_enabled() is ring


def test_compose_config_keeps_the_ring_off_for_workers_in_other_containers():
    config = load_config(bundled_path("configs") / "compose.yaml")
    assert config.transport.ring_enabled() is False and config.inference.workers == 0
