"""The one configuration model of a smartscope run, loaded from YAML.

Every limit, device label and address lives here, never in code. Bad values are
refused at load with the failing field named (pydantic), so a run never starts
half-configured.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from smartscope.resources import bundled_path
from smartscope.simulation.config import SimulationConfig
from smartscope.transport.protocol import CameraParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PropertyRef(_Strict):
    """A device property that an actuator writes (e.g. a laser's power)."""

    label: str = Field(description="Micro-Manager device label")
    property: str = Field(description="property name on that device")


class DevicesConfig(_Strict):
    """Which Micro-Manager devices play which role. Optional roles may be null."""

    camera: str = "Camera"
    focus: str | None = Field("Focus", description="Z stage label (focus drive)")
    activation_laser: PropertyRef | None = PropertyRef(
        label="ActivationLaser", property="Power_mW"
    )
    excitation_laser: PropertyRef | None = PropertyRef(
        label="ExcitationLaser", property="Power_mW"
    )
    rotation: PropertyRef | None = PropertyRef(label="Rotation", property="Angle_deg")
    xy_stage: str | None = Field(
        "XY", description="XY stage label: moves the field over the sample (a plan's stage positions)"
    )
    channel_group: str | None = Field(
        "Channel", description="config group whose presets are the channels (a plan's channels)"
    )
    interval: PropertyRef | None = Field(
        PropertyRef(label="Camera", property="Interval-ms"),
        description="camera property holding the frame interval (optional fast path: it paces hardware-sequenced "
        "bursts); null: the interval of each time point is kept in software (its start time), on any camera",
    )


class HardwareConfig(_Strict):
    camera: CameraParams | None = Field(
        None,
        description="camera calibration for real hardware (simulated mode takes it "
        "from simulation.camera)",
    )
    mode: Literal["simulated", "micromanager"] = "simulated"
    mm_config: str | None = Field(
        None,
        description="Micro-Manager .cfg file (mode=micromanager); null loads the "
        "standard demo config (needs the mm-test-adapters package)",
    )
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    realtime: bool = Field(
        True,
        description="simulated camera paces frames at the real frame interval",
    )
    seed: int = 0
    keep_truth: bool = Field(
        False, description="simulated mode: keep every frame's ground truth in memory (tests, benchmarks)"
    )


class AcquisitionConfig(_Strict):
    exposure_ms: float = Field(20.0, gt=0)
    interval_ms: float = Field(20.0, ge=0)
    frames: int = Field(300, ge=1, description="frames per acquisition by default")
    burst_frames: int = Field(
        100, ge=1, description="frames per hardware-sequenced burst of a time-lapse the camera paces; a pause "
        "or a switch to software-timed frames takes effect at once or at the burst's end, respectively")
    activation_mw: float | None = Field(20.0, description="activation power at start (null: leave)")
    excitation_mw: float | None = Field(50.0, description="excitation power at start (null: leave)")


class Range(_Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class ActuatorLimits(_Strict):
    """Envelope of one actuator: absolute range, largest single step, pacing."""

    range: Range
    max_step: float | None = Field(None, gt=0, description="largest change per move")
    min_period_s: float = Field(0.0, ge=0, description="rate limit between moves")
    max_speed_per_s: float | None = Field(
        None, gt=0,
        description="largest speed (units per second, e.g. deg/s for the rotation stage): "
        "after a move of size d the next move waits d / max_speed_per_s",
    )
    safe_value: float | None = Field(
        None, description="value set on safe hold / shutdown (lasers: 0); must lie within range"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ActuatorLimits:
        if problems := self._problems():
            raise ValueError("; ".join(problems))
        return self

    def _problems(self) -> list[str]:
        if self.safe_value is not None and not self.range.min <= self.safe_value <= self.range.max:
            return [f"safe_value {self.safe_value} is outside range [{self.range.min}, {self.range.max}]"]
        return []


class LaserLimits(ActuatorLimits):
    """A laser's envelope: no negative power, and a safe value inside the range."""

    def _problems(self) -> list[str]:
        negative = [f"range.min {self.range.min} is a negative power"] if self.range.min < 0 else []
        return negative + super()._problems()


def _limits(lo: float, hi: float, kind: type[ActuatorLimits] = ActuatorLimits, **kw: Any) -> ActuatorLimits:
    return kind(range=Range(min=lo, max=hi), **kw)


class SafetyConfig(_Strict):
    """The safety envelope: every actuator change is clamped to these."""

    activation_mw: LaserLimits = Field(
        default_factory=lambda: _limits(0, 300, LaserLimits, max_step=30, min_period_s=0.05, safe_value=0)
    )
    excitation_mw: LaserLimits = Field(
        default_factory=lambda: _limits(0, 100, LaserLimits, max_step=10, min_period_s=0.05, safe_value=0)
    )
    z_um: ActuatorLimits = Field(
        default_factory=lambda: _limits(-20, 20, max_step=0.2, min_period_s=0.05)
    )
    interval_ms: ActuatorLimits = Field(
        default_factory=lambda: _limits(10, 1000, min_period_s=0.1)
    )
    angle_deg: ActuatorLimits = Field(
        default_factory=lambda: _limits(-60, 60, max_step=15, min_period_s=0.5, max_speed_per_s=30)
    )
    stale_after_s: float = Field(
        2.0, gt=0, description="no fresh inference for this long: safe hold"
    )
    on_inference_loss: Literal["safe", "hold"] = Field(
        "safe", description="while no inference result comes (every worker dead or stuck) the policies hold; "
        "safe: the lasers also go to their safe values, and back to where they were when results return; "
        "hold: the lasers keep their last power")
    stage_x_um: Range | None = Field(None, description="XY stage travel allowed to a plan's positions (x, µm)")
    stage_y_um: Range | None = Field(None, description="XY stage travel allowed to a plan's positions (y, µm)")


class TransportConfig(_Strict):
    frames_address: str = "tcp://127.0.0.1:5555"
    results_address: str = "tcp://127.0.0.1:5556"
    send_hwm: int = Field(
        16, ge=1, description="the frames socket's bound per worker (a worker gets only the frames it asked for, "
        "1 on CPU, so this is never reached in normal work)"
    )
    shared_memory: Literal["auto", "on", "off"] = Field(
        "auto", description="pixels through a shared-memory ring, headers through ZeroMQ (workers on this host "
        "only, Linux); auto: on when frames_address is ipc:// or loopback tcp, where no remote worker can connect"
    )
    ring_slots: int = Field(16, ge=2, description="frames the shared-memory ring lends to workers at once")
    auth: Literal["curve", "none"] = Field(
        "curve", description="curve: both sockets take only workers whose key is authorized in keys_dir "
        "(ZeroMQ CURVE, authenticated and encrypted); none: any process that reaches the ports (loopback only)")
    keys_dir: str | None = Field(
        None, description="CURVE keys (made on first start, owner-only); default ~/.config/smartscope/keys")

    @model_validator(mode="after")
    def _authenticated_off_host(self) -> TransportConfig:
        if self.auth == "none":
            open_ = [a for a in (self.frames_address, self.results_address) if not _local_address(a)]
            if open_:
                raise ValueError(f"auth none is allowed only on loopback or ipc://, not on {', '.join(open_)}: "
                                 "any host that reaches the port could steer the lasers with forged results")
        return self

    def resolved_keys_dir(self) -> Path:
        from smartscope.transport.keys import default_keys_dir

        return Path(self.keys_dir).expanduser() if self.keys_dir else default_keys_dir()

    def ring_enabled(self) -> bool:
        if self.shared_memory != "auto":
            return self.shared_memory == "on"
        if sys.platform != "linux":  # workers map the ring from /dev/shm
            return False
        return _local_address(self.frames_address)


def _local_address(address: str) -> bool:
    """Only processes on this host can reach it (ipc, inproc, loopback tcp)."""
    return address.startswith(("ipc://", "inproc://", "tcp://127.", "tcp://localhost:", "tcp://[::1]"))


class InferenceConfig(_Strict):
    model: str | None = Field(
        "localization.onnx", description="localization model: path, or name in models/; auto: the variant of "
        "localization.onnx whose card shows it measured faster on this provider at <= 1 % accuracy loss (int8 on "
        "CPU), else localization.onnx; null: none (live imaging)"
    )
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = Field(
        "auto", description="auto: CUDA when onnxruntime-gpu finds a GPU, else CPU; tensorrt only when asked"
    )
    detection_threshold: float = Field(0.5, gt=0, lt=1)
    counting_model: str | None = Field(
        None, description="emitter-counting model (e.g. counting.onnx): per-frame density for the illumination policy"
    )
    event_model: str | None = Field(
        None, description="event-detection model (e.g. events.onnx): per-frame event score for the frame-rate policy"
    )
    event_views: Literal["card", "one"] = Field(
        "card", description="card: as the event model's card measured it (the window and its 3 mirror images, "
        "4.4-5.6x the compute); one: the window alone, for machines that cannot keep up (the card's metrics.one_view)"
    )
    channel: str | None = Field(
        None, description="the channel preset whose frames the models read (e.g. SMLM): frames of other channels "
        "are stored, not inferred, so no policy acts on a channel it was not set for; null: every frame")
    catch_up: bool = Field(
        True, description="after a run that ended by itself, with a localization model: send the frames the live "
        "stream replaced (every worker busy) to the workers from the run's files, so localizations.csv covers every "
        "frame; a stop skips it")
    psf_calibration: str | None = Field(
        None, description="a PSF calibrated from a bead z-stack on this microscope (`smartscope calibrate psf "
        "BEADS.tif --z-step-nm 25 --out psf.npz`): the localization's maximum-likelihood refinement fits it (x, y, "
        "z, photons, background) instead of the model card's astigmatic Gaussian, at the bound for any PSF shape "
        "(models/README.md); null: the card's Gaussian")
    tile_px: int | None = Field(
        1024, ge=64, description="frames larger than this on either side are cut into overlapping tiles of about "
        "this size (the model's receptive field as the margin), each inferred by the next free worker and merged "
        "into the frame's result: several workers share one large frame, and a worker's memory stays bounded (the "
        "network needs ~0.9 GB per megapixel). Only with a localization model alone (the counting and event "
        "models look at whole frames); null: frames always whole")
    workers: int = Field(1, ge=0, description="worker processes the daemon starts (and restarts when one dies)")
    require_workers: bool = Field(
        True, description="an acquisition starts only with a live inference worker (unless its request says "
        "otherwise); false for a microscope run without inference")
    max_respawns: int = Field(
        5, ge=0, description="a spawned worker that dies is started again after a back-off (0.5 s, doubling); "
        "after this many failures in a row the daemon stops trying")
    threads_per_worker: int | None = Field(
        None, ge=1, description="ONNX Runtime threads in each worker the daemon starts (default: cores / workers)"
    )
    max_batch: int | None = Field(
        None, ge=1, description="frames a worker that is behind runs at once (default: 1 on CPU, 8 on GPU)"
    )


class PolicySpec(_Strict):
    name: str
    module: str = Field(description="import path, e.g. policies.illumination")
    enabled: bool = True
    params: dict[str, Any] = Field(default_factory=dict)


class ApiConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    token: str | None = Field(
        None, description="bearer token; SMARTSCOPE_TOKEN in the environment wins"
    )
    protect_reads: bool = False
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins allowed to call the API (CORS), e.g. ['http://localhost:3000']; "
        "empty: CORS closed",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    allowed_hosts: list[str] | None = Field(
        None, description="host names the API answers to (the Host header; also the WebSocket's Origin), "
        "against DNS rebinding; default: loopback names, this machine's name and api.host; ['*']: any")

    def resolved_allowed_hosts(self) -> list[str]:
        if self.allowed_hosts is not None:
            return list(self.allowed_hosts)
        names = ["127.0.0.1", "localhost", "::1", socket.gethostname()]
        return names + ([self.host] if self.host not in ("0.0.0.0", "::", "") else [])

    def resolved_token(self) -> str | None:
        return os.environ.get("SMARTSCOPE_TOKEN") or self.token


class StorageConfig(_Strict):
    root: str = Field("data", description="acquisitions started over the API go to root/<name or id>")
    format: Literal["tiff", "zarr"] = Field(
        "tiff", description="frames as OME-TIFF (frames.ome.tif) or OME-Zarr (frames.ome.zarr, tensorstore)")
    reserve_mb: float = Field(
        100, ge=0, description="a run starts only if the disk holds all its frames and this much besides")
    max_pending_mb: float = Field(
        1024, gt=0, description="frames waiting for the disk at most (memory); beyond it the camera waits, and a "
        "disk that stays behind for 10 s stops the run")


class SmartscopeConfig(_Strict):
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    acquisition: AcquisitionConfig = Field(default_factory=AcquisitionConfig)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    policies: list[PolicySpec] = Field(default_factory=list)
    api: ApiConfig = Field(default_factory=ApiConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and what to fix."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {where}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None) -> SmartscopeConfig:
    """Load a YAML config; None loads the shipped demo config."""
    path = Path(path) if path is not None else bundled_path("configs") / "demo.yaml"
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    try:
        return SmartscopeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path))) from e
