"""The wire format between the daemon and inference workers (version 2).

A frame travels as a ZeroMQ message whose first part is a JSON header:
- inline (any worker, any host): a second part holds the raw pixel buffer,
  sent zero-copy and viewed as an array on receipt (no copy either side);
- shared memory (workers on the daemon's host): the header names a slot of
  the daemon's frame ring (transport/ring.py) and no pixels travel at all.
Workers send back one JSON part per message: results, hello/heartbeat/bye
announcements, and ring-slot releases.

Anything that does not decode into these models is a malformed message: the
receiver counts it under a reason (MALFORMED_REASONS) and drops it; it never
raises out of a receive loop.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 2
LOCALIZATION_COLUMNS = ("x_nm", "y_nm", "z_nm", "photons", "uncertainty_nm", "p")
#: why a message was dropped: counted per reason by every receiver
MALFORMED_REASONS = ("parts", "json", "version", "header", "size", "ring", "result")


class MalformedMessage(ValueError):
    """A message that does not follow this protocol; `reason` is one of MALFORMED_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class CameraParams(BaseModel):
    """What a worker needs to turn ADU into photons and pixels into nm."""

    model_config = ConfigDict(extra="forbid")
    pixel_size_nm: float = Field(gt=0)
    offset_adu: float = Field(ge=0)
    e_per_adu: float = Field(gt=0)
    qe: float = Field(gt=0, le=1)
    em_gain: float = Field(1.0, ge=1)


class RingRef(BaseModel):
    """Where a frame's pixels lie in the daemon's shared-memory ring."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="SharedMemory block name")
    slot: int = Field(ge=0)
    gen: int = Field(ge=1, description="the slot's generation when written; a reader checks it is unchanged")


class FrameHeader(BaseModel):
    """One frame's identity and the acquisition state at capture."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[2] = PROTOCOL_VERSION
    acquisition: str = Field("", description="id of the acquisition the frame belongs to")
    seq: int = Field(ge=0, description="frame number in this acquisition, 0-based; gaps in results are counted")
    t_capture_s: float = Field(description="daemon wall clock when the frame was read")
    t_sent_s: float | None = Field(None, description="daemon wall clock when the frame was handed to ZeroMQ")
    shape: tuple[int, int]
    dtype: Literal["uint8", "uint16", "uint32", "float32"]
    exposure_ms: float
    interval_ms: float | None = None
    activation_mw: float | None = None
    excitation_mw: float | None = None
    z_um: float | None = None
    angle_deg: float | None = None
    camera: CameraParams
    ring: RingRef | None = Field(None, description="pixels in shared memory instead of a second message part")

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize


class StageTimes(BaseModel):
    """Where one frame's latency went, measured by the worker (ms)."""

    model_config = ConfigDict(extra="forbid")
    t_received_s: float = Field(description="worker wall clock when the frame was taken off the socket")
    pre_ms: float = Field(description="ADU → photons, normalisation, temporal window")
    infer_ms: float = Field(description="ONNX Runtime")
    post_ms: float = Field(description="maps → localizations (peak finding, refinement), scores")
    batch: int = Field(1, ge=1, description="frames run together in this inference call")


class Result(BaseModel):
    """A worker's message to the daemon: a frame's result, or a worker announcement.

    kind: result (one frame), hello (at start), heartbeat (every few seconds
    while idle), bye (at exit), release (ring slots the worker is done with).
    Every message carries the worker's running counters, so the daemon's view
    of each worker is never older than its last message.
    """

    model_config = ConfigDict(extra="forbid")
    v: Literal[2] = PROTOCOL_VERSION
    kind: Literal["result", "hello", "heartbeat", "bye", "release"] = "result"
    seq: int = -1
    t_capture_s: float = 0.0
    t_done_s: float = 0.0
    worker_id: str
    host: str = ""
    provider: str
    model: str
    threads: int | None = None
    max_batch: int = 1
    infer_ms: float = Field(0.0, description="pre-processing + inference + post-processing (ms)")
    stages: StageTimes | None = None
    n_emitters: int = 0
    localizations: list[tuple[float, float, float, float, float, float]] = Field(
        default_factory=list, description=f"rows of {LOCALIZATION_COLUMNS}"
    )
    background_photons: float | None = None
    event_score: float | None = None
    count_estimate: int | None = Field(None, description="emitters on in this frame (counting model)")
    density_per_um2: float | None = Field(None, description="count_estimate per µm² of the field")
    frames_received: int = Field(0, description="frame messages this worker took off the socket so far")
    frames_skipped: int = Field(0, description="frames this worker skipped for newer ones so far")
    skipped_seqs: list[int] = Field(default_factory=list, description="frames skipped since the last message")
    malformed: dict[str, int] = Field(default_factory=dict, description="frame messages dropped so far, per reason")
    released: list[tuple[int, int]] = Field(default_factory=list, description="ring (slot, gen) pairs given back")
    header: FrameHeader | None = None


def encode_frame(header: FrameHeader, frame: np.ndarray | None) -> list:
    """Header JSON, then the frame buffer itself (no copy); header only for ring frames."""
    if header.ring is not None:
        return [header.model_dump_json().encode()]
    if frame is None or frame.shape != tuple(header.shape) or str(frame.dtype) != header.dtype:
        raise ValueError("header shape/dtype does not describe the frame")
    return [header.model_dump_json().encode(), np.ascontiguousarray(frame)]


def decode_header(data) -> FrameHeader:
    """The header part alone; MalformedMessage with the reason on anything unexpected."""
    try:
        raw = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedMessage("json", str(e)) from e
    if not isinstance(raw, dict) or raw.get("v") != PROTOCOL_VERSION:
        version = raw.get("v") if isinstance(raw, dict) else None
        raise MalformedMessage("version", f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    try:
        return FrameHeader.model_validate(raw)
    except ValidationError as e:
        raise MalformedMessage("header", str(e)) from e


def decode_frame(parts: list) -> tuple[FrameHeader, np.ndarray | None]:
    """Inverse of encode_frame: (header, pixels as a view of the received buffer).

    For a ring frame the pixels are None: the caller maps them from the ring.
    """
    if not parts or len(parts) > 2:
        raise MalformedMessage("parts", f"expected 1 or 2 parts, got {len(parts)}")
    header = decode_header(parts[0])
    if header.ring is not None:
        if len(parts) != 1:
            raise MalformedMessage("parts", "a ring frame carries no pixel part")
        return header, None
    if len(parts) != 2:
        raise MalformedMessage("parts", "an inline frame needs its pixel part")
    buf = parts[1].buffer if hasattr(parts[1], "buffer") else parts[1]
    size = len(memoryview(buf).cast("B"))
    if size != header.nbytes:
        raise MalformedMessage("size", f"frame buffer has {size} bytes, the header describes {header.nbytes}")
    return header, np.frombuffer(buf, dtype=header.dtype).reshape(header.shape)


def encode_result(result: Result) -> bytes:
    return result.model_dump_json().encode()


def decode_result(data: bytes) -> Result:
    try:
        return Result.model_validate_json(data)
    except ValueError as e:  # pydantic's ValidationError included
        raise MalformedMessage("result", str(e)) from e
