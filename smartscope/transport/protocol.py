"""The wire format between the daemon and inference workers (version 5: workers ask for frames; tiles).

A frame travels as a ZeroMQ message whose first part is a compact binary
header (FrameHeader; a fixed little-endian struct, then two UTF-8 strings):
- inline (any worker, any host): a second part holds the raw pixel buffer,
  sent zero-copy and viewed as an array on receipt (no copy either side);
- shared memory (workers on the daemon's host): the header names a slot of
  the daemon's frame ring (transport/ring.py) and no pixels travel at all.
The header is binary, not JSON, because at camera rates it is per-message
cost: packing and checking it takes about a microsecond, where building and
validating a JSON model took ten, which at 256² frames was half the time of
the send itself. A frame too large for one worker travels as tiles
(inference/tiling.py): each tile is a frame message of its own whose header
also carries a TilePart (where the crop lies in the whole frame, the core it
owns, and the whole frame's statistics), and the daemon merges the tiles'
results into the frame's. Workers send back one JSON part per message (Result):
results, hello/heartbeat/bye announcements, ring-slot releases. On the frames
socket a worker asks for frames with a READY message (how many it can take
now): the daemon sends a frame only to a worker that asked (transport/sockets.py).

Anything that does not decode is a malformed message: the receiver counts it
under a reason (MALFORMED_REASONS) and drops it; it never raises out of a
receive loop (tests/test_transport.py feeds each kind of bad message).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROTOCOL_VERSION = 6
MAGIC = b"SSFH"  # smartscope frame header
LOCALIZATION_COLUMNS = ("x_nm", "y_nm", "z_nm", "photons", "uncertainty_nm", "p", "background_photons")
#: why a message was dropped: counted per reason by every receiver
MALFORMED_REASONS = ("parts", "format", "version", "header", "size", "ring", "result")
DTYPES = ("uint8", "uint16", "uint32", "float32")
_NP_DTYPES = {name: np.dtype(name) for name in DTYPES}  # looked up, not parsed, per frame
STATE_FIELDS = ("interval_ms", "activation_mw", "excitation_mw", "x_um", "y_um", "z_um", "angle_deg")
#: the useq MDA index a frame carries: time point, stage position, grid position, channel, z slice
INDEX_AXES = ("t", "p", "g", "c", "z")

# magic, version, dtype code, has ring, seq, t_capture, t_sent, height, width, exposure, the seven state
# values, the six camera values (NaN: not known), ring slot, ring generation, the five MDA index values,
# the tile part (index, count, crop origin, core, whole-frame shape, three whole-frame statistics; count 0: a
# whole frame), then the two string lengths
_FIXED = struct.Struct("<4sHBBQddIId7d6dIQ5IHH8I3dHH")
_READY = struct.Struct("<4sHHI")  # magic, version, frames the worker can take now, the request's number
READY_MAGIC = b"SSRD"
MAX_READY_FRAMES = 64


class MalformedMessage(ValueError):
    """A message that does not follow this protocol; `reason` is one of MALFORMED_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class CameraParams(BaseModel):
    """What a worker needs to turn ADU into photons and pixels into nm."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pixel_size_nm: float = Field(gt=0)
    offset_adu: float = Field(ge=0)
    e_per_adu: float = Field(gt=0)
    qe: float = Field(gt=0, le=1)
    em_gain: float = Field(1.0, ge=1)
    read_noise_e: float = Field(0.0, ge=0, description="rms read noise per pixel (electrons, sCMOS); the "
                                "localization MLE adds its variance to each pixel's")


class RingRef(NamedTuple):
    """Where a frame's pixels lie in the daemon's shared-memory ring."""

    name: str  # SharedMemory block name
    slot: int
    gen: int  # the slot's generation when written; a reader checks it is unchanged after reading


class TilePart(NamedTuple):
    """Which tile of a whole frame a message carries (inference/tiling.py: Tile, FrameStatistics). The crop is
    [y0, y0 + height) × [x0, x0 + width) of the frame (height, width: the header's shape); the tile owns the core
    [core_y0, core_y1) × [core_x0, core_x1); the statistics are the whole frame's, in photons/px."""

    index: int
    count: int
    y0: int
    x0: int
    core_y0: int
    core_y1: int
    core_x0: int
    core_x1: int
    frame_height: int
    frame_width: int
    fill_photons: float
    median_photons: float
    background_photons: float


@dataclass(slots=True)
class FrameHeader:
    """One frame's identity and the acquisition state at capture."""

    seq: int  # frame number in this acquisition, 0-based; gaps in results are counted
    t_capture_s: float  # daemon wall clock when the frame was read
    shape: tuple[int, int]
    dtype: Literal["uint8", "uint16", "uint32", "float32"]
    exposure_ms: float
    camera: CameraParams
    acquisition: str = ""  # id of the acquisition the frame belongs to
    t_sent_s: float | None = None  # daemon wall clock when the frame was handed to ZeroMQ
    interval_ms: float | None = None
    activation_mw: float | None = None
    excitation_mw: float | None = None
    x_um: float | None = None
    y_um: float | None = None
    z_um: float | None = None
    angle_deg: float | None = None
    ring: RingRef | None = None  # pixels in shared memory instead of a second message part
    tile: TilePart | None = None  # the pixels are one tile of a larger frame
    # the frame's MDA index (useq): frames of one (p, g, c, z) form one stream in time (t)
    t: int = 0
    p: int = 0
    g: int = 0
    c: int = 0
    z: int = 0

    @property
    def index(self) -> dict[str, int]:
        """The frame's MDA index by axis name (INDEX_AXES)."""
        return {axis: getattr(self, axis) for axis in INDEX_AXES}

    @property
    def stream(self) -> tuple[str, int, int, int, int]:
        """The frames a temporal window may combine: one acquisition, position, grid tile, channel, z slice, and
        for a frame sent in tiles, one tile of it."""
        return (self.acquisition, self.p, self.g, self.c, self.z, self.tile.index if self.tile else -1)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * _NP_DTYPES[self.dtype].itemsize


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def pack_header(h: FrameHeader) -> bytes:
    acq, ring_name = h.acquisition.encode(), (h.ring.name.encode() if h.ring else b"")
    c = h.camera
    return _FIXED.pack(MAGIC, PROTOCOL_VERSION, DTYPES.index(h.dtype), h.ring is not None, h.seq, h.t_capture_s,
                       _nan(h.t_sent_s), h.shape[0], h.shape[1], h.exposure_ms, _nan(h.interval_ms),
                       _nan(h.activation_mw), _nan(h.excitation_mw), _nan(h.x_um), _nan(h.y_um), _nan(h.z_um),
                       _nan(h.angle_deg), *(getattr(c, name) for name in CameraParams.model_fields),
                       h.ring.slot if h.ring else 0, h.ring.gen if h.ring else 0, h.t, h.p, h.g, h.c, h.z,
                       *(h.tile or _NO_TILE), len(acq), len(ring_name)
                       ) + acq + ring_name


_NO_TILE = TilePart(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0)


def _tile_part(values: tuple, shape: tuple[int, int]) -> TilePart | None:
    """The header's tile values → a TilePart (None for a whole frame); MalformedMessage where they do not
    describe a crop of the frame that holds its core."""
    part = TilePart(*values)
    if part.count == 0:
        return None
    h, w = shape
    fits = (part.index < part.count and part.y0 + h <= part.frame_height and part.x0 + w <= part.frame_width
            and part.y0 <= part.core_y0 < part.core_y1 <= part.y0 + h
            and part.x0 <= part.core_x0 < part.core_x1 <= part.x0 + w
            and all(math.isfinite(v) for v in part[10:]))
    if not fits:
        raise MalformedMessage("header", f"tile {part.index} of {part.count} does not fit its frame: {part}")
    return part


_camera_cache: dict[tuple[float, ...], CameraParams] = {}  # camera parameters change rarely: validate once


def _camera(values: tuple[float, ...]) -> CameraParams:
    camera = _camera_cache.get(values)
    if camera is None:
        camera = CameraParams(**dict(zip(CameraParams.model_fields, values, strict=True)))
        if len(_camera_cache) > 64:
            _camera_cache.clear()
        _camera_cache[values] = camera
    return camera


def decode_header(data) -> FrameHeader:
    """The header part alone; MalformedMessage with the reason on anything unexpected."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) < _FIXED.size or data[:4] != MAGIC:
        raise MalformedMessage("format", f"not a smartscope frame header ({len(data)} bytes)")
    (_, version, dtype_code, has_ring, seq, t_capture, t_sent, height, width, exposure, *rest) = _FIXED.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise MalformedMessage("version", f"protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    n_acq, n_ring = rest[-2], rest[-1]
    if len(data) != _FIXED.size + n_acq + n_ring:
        raise MalformedMessage("header", f"{len(data)} bytes, the header describes {_FIXED.size + n_acq + n_ring}")
    if dtype_code >= len(DTYPES) or height < 1 or width < 1 or not exposure > 0 or not math.isfinite(t_capture):
        raise MalformedMessage("header", f"dtype code {dtype_code}, {height}x{width} px, exposure {exposure} ms")
    try:
        camera = _camera(tuple(rest[7:13]))
        acquisition = data[_FIXED.size:_FIXED.size + n_acq].decode()
        ring = RingRef(data[_FIXED.size + n_acq:].decode(), rest[13], rest[14]) if has_ring else None
    except (ValidationError, UnicodeDecodeError) as e:
        raise MalformedMessage("header", str(e)) from e
    if ring is not None and ring.gen < 1:
        raise MalformedMessage("ring", f"ring slot {ring.slot} with generation {ring.gen}")
    tile = _tile_part(rest[20:33], (height, width))
    state = [None if v != v else v for v in rest[:7]]  # NaN → None
    return FrameHeader(seq, t_capture, (height, width), DTYPES[dtype_code], exposure, camera, acquisition,
                       None if t_sent != t_sent else t_sent, *state, ring, tile, *rest[15:20])


class StageTimes(BaseModel):
    """Where one frame's latency went, measured by the worker (ms)."""

    model_config = ConfigDict(extra="forbid")
    t_received_s: float = Field(description="worker wall clock when the frame was taken off the socket")
    pre_ms: float = Field(description="ADU → photons, normalisation, temporal window")
    infer_ms: float = Field(description="ONNX Runtime (with the counting/event models' windows, if any)")
    post_ms: float = Field(description="maps → localizations (peak finding, refinement), scores")
    batch: int = Field(1, ge=1, description="frames run together in this inference call")


class Result(BaseModel):
    """A worker's message to the daemon: a frame's result, or a worker announcement.

    kind: result (one frame), hello (at start), heartbeat (every few seconds
    while idle), bye (at exit), release (frames done with without a result,
    by number, and ring slots given back; any message may carry these).
    Every message carries the worker's running counters, so the daemon's view
    of each worker is never older than its last message.
    """

    model_config = ConfigDict(extra="forbid")
    v: Literal[PROTOCOL_VERSION] = PROTOCOL_VERSION  # type: ignore[valid-type]  (one number for every message)
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
    infer_ms: float = Field(0.0, description="the worker's whole time on the frame: pre + inference + post (ms)")
    stages: StageTimes | None = None
    n_emitters: int = 0
    localizations: list[tuple[float, float, float, float, float, float, float]] = Field(
        default_factory=list, description=f"rows of {LOCALIZATION_COLUMNS}"
    )
    background_photons: float | None = None
    peak_px: list[int] = Field(
        default_factory=list, description="for a tile: the whole-frame pixel (row × width + column) each "
        "localization was detected at, so the merged frame lists them in the whole frame's order")
    event_score: float | None = None
    count_estimate: int | None = Field(None, description="emitters on in this frame (counting model)")
    density_per_um2: float | None = Field(None, description="count_estimate per µm² of the field")
    frames_received: int = Field(0, description="frame messages this worker took off the socket so far")
    frames_skipped: int = Field(0, description="frames this worker skipped for newer ones so far")
    skipped: list[tuple[str, int]] = Field(
        default_factory=list, description="(acquisition, seq) of the frames this worker is done with without a "
        "result since its last message: skipped for newer ones, or dropped as unreadable (counted in malformed)")
    malformed: dict[str, int] = Field(default_factory=dict, description="frame messages dropped so far, per reason")
    released: list[tuple[int, int]] = Field(default_factory=list, description="ring (slot, gen) pairs given back")
    header: FrameHeader | None = None


def check_frame(header: FrameHeader, frame: np.ndarray) -> None:
    """ValueError unless the header describes the frame (shape and dtype)."""
    if frame.shape != tuple(header.shape) or header.dtype not in _NP_DTYPES \
            or frame.dtype != _NP_DTYPES[header.dtype]:
        raise ValueError(f"header ({header.shape}, {header.dtype}) does not describe the frame "
                         f"({frame.shape}, {frame.dtype})")


def encode_frame(header: FrameHeader, frame: np.ndarray | None) -> list:
    """Header, then the frame buffer itself (no copy); the header alone for ring frames."""
    if header.ring is not None:
        return [pack_header(header)]
    if frame is None:
        raise ValueError("an inline frame needs its pixels")
    check_frame(header, frame)
    return [pack_header(header), frame if frame.flags.c_contiguous else np.ascontiguousarray(frame)]


def decode_frame(parts: list) -> tuple[FrameHeader, np.ndarray | None]:
    """Inverse of encode_frame: (header, pixels as a view of the received buffer).

    For a ring frame the pixels are None: the caller maps them from the ring.
    """
    if not parts or len(parts) > 2:
        raise MalformedMessage("parts", f"expected 1 or 2 parts, got {len(parts)}")
    header = decode_header(parts[0].bytes if hasattr(parts[0], "bytes") else parts[0])
    if header.ring is not None:
        if len(parts) != 1:
            raise MalformedMessage("parts", "a ring frame carries no pixel part")
        return header, None
    if len(parts) != 2:
        raise MalformedMessage("parts", "an inline frame needs its pixel part")
    buf = parts[1].buffer if hasattr(parts[1], "buffer") else memoryview(parts[1])
    if buf.nbytes != header.nbytes:
        raise MalformedMessage("size", f"frame buffer has {buf.nbytes} bytes, the header describes {header.nbytes}")
    return header, np.frombuffer(buf, dtype=_NP_DTYPES[header.dtype]).reshape(header.shape)


def encode_ready(frames: int, request: int = 0) -> bytes:
    """A worker's request for up to `frames` frames (its credit: the daemon sends no more until it asks again).

    `request` numbers the worker's requests: a new number each time it becomes
    free, the same one when it repeats a request while idle (for a daemon that
    restarted). The daemon ignores a repeat of a request it already sent frames
    against, so a repeat that crosses a frame on its way gives no second frame.
    """
    return _READY.pack(READY_MAGIC, PROTOCOL_VERSION, frames, request)


def decode_ready(data: bytes) -> tuple[int, int]:
    """Inverse of encode_ready: (frames asked for (1..MAX_READY_FRAMES), request number)."""
    if len(data) != _READY.size:
        raise MalformedMessage("format", f"a ready message has {_READY.size} bytes, got {len(data)}")
    magic, version, frames, request = _READY.unpack(data)
    if magic != READY_MAGIC:
        raise MalformedMessage("format", f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise MalformedMessage("version", f"protocol version {version}, this side speaks {PROTOCOL_VERSION}")
    if not 1 <= frames <= MAX_READY_FRAMES:
        raise MalformedMessage("header", f"asked for {frames} frames (1..{MAX_READY_FRAMES})")
    return frames, request


def encode_result(result: Result) -> bytes:
    return result.model_dump_json().encode()


def decode_result(data: bytes) -> Result:
    try:
        return Result.model_validate_json(data)
    except ValueError as e:  # pydantic's ValidationError included
        raise MalformedMessage("result", str(e)) from e
