"""The wire format between the daemon and inference workers (version 1).

Frames travel as a two-part ZeroMQ message: a JSON header and the raw pixel
buffer (sent zero-copy). Results travel back as one JSON part. Anything that
does not decode into these models is a malformed message: the receiver counts
it and drops it, it never raises out of a receive loop.
"""

from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 1
LOCALIZATION_COLUMNS = ("x_nm", "y_nm", "z_nm", "photons", "uncertainty_nm", "p")


class MalformedMessage(ValueError):
    """A message that does not follow this protocol."""


class CameraParams(BaseModel):
    """What a worker needs to turn ADU into photons and pixels into nm."""

    model_config = ConfigDict(extra="forbid")
    pixel_size_nm: float = Field(gt=0)
    offset_adu: float = Field(ge=0)
    e_per_adu: float = Field(gt=0)
    qe: float = Field(gt=0, le=1)
    em_gain: float = Field(1.0, ge=1)


class FrameHeader(BaseModel):
    """One frame's identity and the acquisition state at capture."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = PROTOCOL_VERSION
    acquisition: str = Field("", description="id of the acquisition the frame belongs to")
    seq: int = Field(ge=0, description="frame number in this acquisition, 0-based")
    t_capture_s: float = Field(description="daemon wall clock when the frame was read")
    shape: tuple[int, int]
    dtype: Literal["uint8", "uint16", "uint32", "float32"]
    exposure_ms: float
    interval_ms: float | None = None
    activation_mw: float | None = None
    excitation_mw: float | None = None
    z_um: float | None = None
    angle_deg: float | None = None
    camera: CameraParams


class Result(BaseModel):
    """A worker's inference output for one frame."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = PROTOCOL_VERSION
    kind: Literal["result", "hello"] = "result"
    seq: int = -1
    t_capture_s: float = 0.0
    t_done_s: float = 0.0
    worker_id: str
    provider: str
    model: str
    infer_ms: float = 0.0
    n_emitters: int = 0
    localizations: list[tuple[float, float, float, float, float, float]] = Field(
        default_factory=list, description=f"rows of {LOCALIZATION_COLUMNS}"
    )
    background_photons: float | None = None
    event_score: float | None = None
    count_estimate: int | None = Field(None, description="emitters on in this frame (counting model)")
    density_per_um2: float | None = Field(None, description="count_estimate per µm² of the field")
    malformed_frames: int = Field(0, description="malformed frame messages this worker dropped so far")
    header: FrameHeader | None = None


def encode_frame(header: FrameHeader, frame: np.ndarray) -> list:
    """Two parts: header JSON, then the frame buffer itself (no copy)."""
    if frame.shape != tuple(header.shape) or str(frame.dtype) != header.dtype:
        raise ValueError("header shape/dtype does not describe the frame")
    return [header.model_dump_json().encode(), np.ascontiguousarray(frame)]


def decode_frame(parts: list) -> tuple[FrameHeader, np.ndarray]:
    """Inverse of encode_frame; MalformedMessage on anything unexpected."""
    if len(parts) != 2:
        raise MalformedMessage(f"expected 2 parts, got {len(parts)}")
    try:
        header = FrameHeader.model_validate_json(bytes(parts[0]))
    except (ValidationError, ValueError) as e:
        raise MalformedMessage(f"bad frame header: {e}") from e
    buf = parts[1].buffer if hasattr(parts[1], "buffer") else parts[1]
    dtype = np.dtype(header.dtype)
    expected = header.shape[0] * header.shape[1] * dtype.itemsize
    if len(memoryview(buf).cast("B")) != expected:
        raise MalformedMessage(f"frame buffer is not {expected} bytes")
    return header, np.frombuffer(buf, dtype=dtype).reshape(header.shape)


def encode_result(result: Result) -> bytes:
    return result.model_dump_json().encode()


def decode_result(data: bytes) -> Result:
    try:
        return Result.model_validate_json(data)
    except (ValidationError, ValueError, json.JSONDecodeError) as e:
        raise MalformedMessage(f"bad result: {e}") from e
