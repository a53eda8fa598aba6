"""FastAPI control API over one `Daemon`.

Reads are open unless `api.protect_reads`; everything that changes state needs
`Authorization: Bearer <token>`. With no token configured, writes are refused
outright: nothing that moves hardware runs unauthenticated.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smartscope.service import Busy, Daemon

_bearer = HTTPBearer(auto_error=False)


class StartAcquisition(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"frames": 300}]})
    frames: int | None = Field(None, ge=1, le=10_000_000, description="frames to acquire (default: config)")
    exposure_ms: float | None = Field(None, gt=0, le=10_000)
    interval_ms: float | None = Field(None, ge=0, le=3_600_000)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$",
                             description="folder name under storage root (default: the acquisition id)")


class AcquisitionInfo(BaseModel):
    id: str
    state: str
    frames_requested: int
    frames_acquired: int
    out_dir: str
    summary: dict[str, Any] | None = None


class PropertyValue(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float | str


class PolicyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"enabled": True, "params": {"set_point_emitters": 20}}]})
    enabled: bool | None = None
    params: dict[str, Any] | None = None


class PolicyInfo(BaseModel):
    name: str
    module: str
    enabled: bool
    actuators: list[str]
    params: dict[str, Any]
    params_schema: dict[str, Any]


def _info(run) -> AcquisitionInfo:
    return AcquisitionInfo(id=run.id, state=run.state, frames_requested=run.n_frames,
                           frames_acquired=run.counts.acquired, out_dir=str(run.out_dir), summary=run.summary)


def create_app(daemon: Daemon, *, token: str | None, protect_reads: bool = False) -> FastAPI:
    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if token is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "writes are disabled: no API token configured (set SMARTSCOPE_TOKEN)")
        if creds is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong bearer token")

    read_deps = [Depends(require_token)] if protect_reads else []
    reads = APIRouter(dependencies=read_deps)
    writes = APIRouter(dependencies=[Depends(require_token)])
    app = FastAPI(title="smartscope", version="0.1.0",
                  description="Control API of a smart microscope: acquisitions, devices, policies, decisions.")

    @app.get("/health", tags=["status"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @reads.get("/status", tags=["status"])
    def get_status() -> dict[str, Any]:
        return daemon.status()

    # -- acquisitions ----------------------------------------------------------

    @writes.post("/acquisitions", status_code=201, tags=["acquisitions"], response_model=AcquisitionInfo)
    def start(body: StartAcquisition) -> AcquisitionInfo:
        try:
            run = daemon.start_acquisition(daemon.storage_root / body.name if body.name else None, body.frames,
                                           exposure_ms=body.exposure_ms, interval_ms=body.interval_ms)
        except Busy as e:
            raise HTTPException(status.HTTP_409_CONFLICT, {"message": str(e), "running": e.running_id}) from e
        except ValueError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        return _info(run)

    @writes.post("/acquisitions/current/stop", tags=["acquisitions"], response_model=AcquisitionInfo)
    def stop() -> AcquisitionInfo:
        run = daemon.stop_acquisition()
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no acquisition has run yet")
        return _info(run)

    @reads.get("/acquisitions", tags=["acquisitions"], response_model=list[AcquisitionInfo])
    def list_runs() -> list[AcquisitionInfo]:
        return [_info(r) for r in daemon.runs.values()]

    @reads.get("/acquisitions/{run_id}", tags=["acquisitions"], response_model=AcquisitionInfo)
    def get_run(run_id: str) -> AcquisitionInfo:
        run = daemon.runs.get(run_id)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no acquisition {run_id!r}")
        return _info(run)

    # -- devices ---------------------------------------------------------------

    core = daemon.core

    def _check_property(label: str, prop: str) -> None:
        if label not in core.getLoadedDevices():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {label!r}")
        if not core.hasProperty(label, prop):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {label!r} has no property {prop!r}")

    @reads.get("/devices", tags=["devices"])
    def devices() -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for label in core.getLoadedDevices():
            props = {}
            for prop in core.getDevicePropertyNames(label):
                entry: dict[str, Any] = {"value": core.getProperty(label, prop),
                                         "read_only": core.isPropertyReadOnly(label, prop)}
                if core.hasPropertyLimits(label, prop):
                    entry["limits"] = [core.getPropertyLowerLimit(label, prop),
                                       core.getPropertyUpperLimit(label, prop)]
                allowed = core.getAllowedPropertyValues(label, prop)
                if allowed:
                    entry["allowed"] = list(allowed)
                props[prop] = entry
            out[label] = {"type": str(core.getDeviceType(label)), "properties": props}
        return out

    @reads.get("/devices/{label}/properties/{prop}", tags=["devices"])
    def get_property(label: str, prop: str) -> dict[str, Any]:
        _check_property(label, prop)
        return {"device": label, "property": prop, "value": core.getProperty(label, prop)}

    @writes.put("/devices/{label}/properties/{prop}", tags=["devices"])
    def set_property(label: str, prop: str, body: PropertyValue) -> dict[str, Any]:
        _check_property(label, prop)
        if core.isPropertyReadOnly(label, prop):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{label}.{prop} is read-only")
        value = body.value
        if core.hasPropertyLimits(label, prop):
            lo, hi = core.getPropertyLowerLimit(label, prop), core.getPropertyUpperLimit(label, prop)
            if not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                    f"{label}.{prop} must be a number in [{lo}, {hi}], got {value!r}")
        allowed = core.getAllowedPropertyValues(label, prop)
        if allowed and str(value) not in allowed:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                f"{label}.{prop} must be one of {list(allowed)}, got {value!r}")
        actuator = daemon.actuator.actuator_for_property(label, prop)
        if actuator is not None:  # the hardware door: the envelope applies to people too
            if not isinstance(value, (int, float)) or not daemon.envelope.within_range(actuator, value):
                rng = daemon.envelope.limits(actuator).range
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                    f"{label}.{prop} is {actuator}: must be in the safety envelope "
                                    f"[{rng.min}, {rng.max}], got {value!r}")
            daemon.actuator.write(actuator, float(value))
        else:
            try:
                core.setProperty(label, prop, value)
            except Exception as e:  # Micro-Manager's own refusal, passed on
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        return {"device": label, "property": prop, "value": core.getProperty(label, prop)}

    # -- policies --------------------------------------------------------------

    def _policy_info(name: str) -> PolicyInfo:
        slot = daemon.engine.slots[name]
        pol = slot.policy
        return PolicyInfo(name=name, module=slot.module, enabled=slot.enabled, actuators=list(pol.actuators),
                          params=pol.params.model_dump(), params_schema=pol.Params.model_json_schema())

    @reads.get("/policies", tags=["policies"], response_model=list[PolicyInfo])
    def policies() -> list[PolicyInfo]:
        return [_policy_info(n) for n in daemon.engine.slots]

    @writes.patch("/policies/{name}", tags=["policies"], response_model=PolicyInfo)
    def update_policy(name: str, body: PolicyUpdate) -> PolicyInfo:
        if name not in daemon.engine.slots:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"no policy {name!r}; known: {sorted(daemon.engine.slots)}")
        if body.params is not None:
            try:  # validated in full before anything changes
                daemon.engine.update_params(name, body.params)
            except ValidationError as e:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                    [{"loc": list(err["loc"]), "msg": err["msg"]} for err in e.errors()]) from e
        if body.enabled is not None:
            daemon.engine.set_enabled(name, body.enabled)
        return _policy_info(name)

    @reads.get("/decisions", tags=["decisions"])
    def decisions(limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                  offset: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, Any]]:
        return daemon.decisions.recent(limit, offset)

    app.include_router(reads)
    app.include_router(writes)
    return app

