"""Request and response bodies of the control API (the OpenAPI schema is built from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from useq import MDASequence

MAX_PLATE_WELLS = 1536
RunState = Literal["acquiring", "paused", "finishing", "finished", "cancelled", "errored", "interrupted"]


def _plates(raw: Any, where: str, depth: int = 0):
    """(path, plate dict) of every well plate in a raw (unvalidated) sequence, wherever it is: useq also takes
    plans in unexpected places (found by fuzzing: a grid_plan given as a position with its own sub-sequence)."""
    if depth > 32:  # deeper than any real plan; the body limit bounds the rest
        return
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key == "plate" and isinstance(value, dict):
                yield f"{where}.plate", value
            yield from _plates(value, f"{where}.{key}", depth + 1)
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            yield from _plates(value, f"{where}[{i}]", depth + 1)


def _number(value: Any) -> float | None:
    """A count as pydantic will read it (numbers and numeric strings); None if it is not one."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class StartAcquisition(BaseModel):
    """A time-lapse (`frames` + `interval_ms`), or any useq-schema `sequence` (an MDA experiment)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"frames": 300, "interval_ms": 20, "name": "cell-01"},
        {"sequence": {"time_plan": {"interval": 0.05, "loops": 200}}, "name": "cell-02"},
        {"sequence": {"stage_positions": [[0, 0, 0], [20, 0, 0]], "channels": ["SMLM", "Widefield"],
                      "z_plan": {"range": 1, "step": 0.5}, "time_plan": {"interval": 1, "loops": 4}},
         "name": "two-fields"},
    ]})
    frames: int | None = Field(None, ge=1, le=10_000_000, description="frames to acquire (default: config)")
    exposure_ms: float | None = Field(None, gt=0, le=10_000, description="camera exposure (default: config)")
    interval_ms: float | None = Field(None, ge=0, le=3_600_000,
                                      description="frame interval, inside the safety envelope; 0: as fast as "
                                      "the camera goes (default: config)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$",
                             description="folder name under storage root (default: the acquisition id)")
    sequence: MDASequence | None = Field(
        None, description="useq-schema MDASequence (as pymmcore-plus and ImSwitch take it), run by "
        "pymmcore-plus's MDA runner: time, z (relative to the focus now, or absolute), channels (presets of the "
        "channel group, GET /channels), stage positions with sub-sequences, grids, autofocus. Checked before "
        "anything moves: a channel not in the group, a Z outside the safety envelope or a position outside "
        "the stage limits is refused (422, naming the field). Excludes `frames` and `interval_ms`.")

    policies: list[str] | None = Field(
        None, description="the policies that run in this acquisition (the others are disabled; the choice "
        "stays until changed); default: leave the current enabled set", examples=[["illumination", "focus"]])
    require_workers: StrictBool | None = Field(
        None, description="refuse to start (409) unless an inference worker is live; false: acquire anyway "
        "(frames stored, no policy acts, the lasers keep their power); default: inference.require_workers")

    @field_validator("sequence", mode="before")
    @classmethod
    def _plate_of_real_size(cls, raw: Any) -> Any:
        """useq expands every well of a plate while the body is validated: a few bytes asking for a
        10⁶-well plate would take the daemon's memory. Refused before that, by its size, wherever it is
        (the plan's positions, or a position's own sub-sequence, at any depth)."""
        for where, plate in _plates(raw, "sequence"):
            rows, columns = _number(plate.get("rows")), _number(plate.get("columns"))
            if rows is not None and columns is not None and rows * columns > MAX_PLATE_WELLS:
                raise ValueError(f"{where}: {plate['rows']} x {plate['columns']} wells; at most {MAX_PLATE_WELLS} "
                                 "(a 1536-well plate)")
        return raw

    @model_validator(mode="after")
    def _one_kind(self) -> StartAcquisition:
        if self.sequence is not None and (self.frames is not None or self.interval_ms is not None):
            raise ValueError("give either `sequence` or `frames`/`interval_ms`, not both")
        return self


class AcquisitionInfo(BaseModel):
    """One acquisition: its state (as pymmcore-plus's MDA runner), counts, rates and files."""

    id: str = Field(description="acquisition id (also the folder name unless `name` was given)")
    state: RunState
    frames_requested: int
    progress: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="per axis of the plan (t, p, g, c, z): {done: highest index reached + 1, "
        "of: the axis' size}")
    frames_acquired: int = Field(description="frames read from the camera so far")
    frames_saved: int = Field(description="frames written to frames.ome.tif so far")
    frames_inferred: int = Field(description="frames with an inference result")
    frames_dropped: int = Field(description="frames not sent to inference (worker queues full); always saved")
    acquisition_rate_hz: float | None = Field(None, description="frames acquired per second of run time")
    inference_rate_hz: float | None = Field(None, description="inference results per second of run time")
    exposure_ms: float | None = None
    interval_ms: float | None = None
    pauses: int = 0
    started_s: float = Field(description="UNIX time the acquisition started")
    finished_s: float | None = None
    error: str | None = None
    out_dir: str
    files: dict[str, str] = Field(default_factory=dict, description="output files by role")
    summary: dict[str, Any] | None = Field(None, description="summary.json, once finished")


class ChannelsInfo(BaseModel):
    """The configured channel group (Micro-Manager's ChannelGroup) and its presets."""

    group: str | None = Field(description="null: this microscope has no channel group")
    presets: list[str] = Field(description="what a plan's channels may name (`config`)")
    current: str | None = Field(description="the preset set now, if any")


class PropertyValue(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"value": 12.5}]})
    value: float | str


class PropertyInfo(BaseModel):
    device: str
    property: str
    value: str | float | int = Field(description="the value as the core reports it")


class PolicyUpdate(BaseModel):
    """Fields to change; parameters are validated in full before anything changes."""

    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"enabled": True, "params": {"set_point_emitters": 20}}]})
    enabled: StrictBool | None = None
    params: dict[str, Any] | None = Field(None, description="parameters to change (see params_schema)")


class PolicyInfo(BaseModel):
    name: str
    module: str
    enabled: bool
    actuators: list[str] = Field(description="actuators this policy may move")
    params: dict[str, Any]
    params_schema: dict[str, Any] = Field(description="JSON schema of params")


class Localization(BaseModel):
    x_nm: float
    y_nm: float
    z_nm: float
    photons: float
    uncertainty_nm: float
    p: float = Field(description="detection probability")
    background_photons: float = Field(description="local background at the localization (photons/px)")


class LatestResult(BaseModel):
    """The newest inference result, with the acquisition state at its frame's capture."""

    acquisition: str
    frame: int = Field(description="frame number in the acquisition, 0-based")
    index: dict[str, int] = Field(default_factory=dict, description="the frame's MDA index: t, p, g, c, z")
    t_capture_s: float
    n_emitters: int
    event_score: float | None = Field(None, description="0..1 when an event model runs")
    focus_nm: float | None = Field(None, description="median z of the frame's localizations (defocus estimate)")
    latency_ms: float = Field(description="capture to result")
    background_photons: float | None = None
    activation_mw: float | None = None
    excitation_mw: float | None = None
    x_um: float | None = None
    y_um: float | None = None
    z_um: float | None = None
    interval_ms: float | None = None
    angle_deg: float | None = None
    worker: str
    frames_acquired: int = Field(description="in this acquisition, so far")
    frames_inferred: int = Field(description="in this acquisition, so far")
    localizations_total: int = Field(description="in this acquisition, so far")
    localizations: list[Localization]


class Problem(BaseModel):
    """Every error: `detail` says what to fix (a message, or a list of field errors, or an object)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "missing bearer token"}]})
    detail: str | list[Any] | dict[str, Any]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
