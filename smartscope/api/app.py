"""FastAPI control API over one `Daemon`.

Reads are open unless `api.protect_reads`; everything that changes state needs
`Authorization: Bearer <token>`. With no token configured, writes are refused
outright: nothing that moves hardware runs unauthenticated. Tokens are
compared in constant time and never logged (a `token=` in a URL is redacted
from uvicorn's logs). CORS is closed unless `api.cors_origins` lists origins;
request bodies over `api.max_body_bytes` get 413 before anything reads them.
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import time
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, WebSocket, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from smartscope.api.console import add_console
from smartscope.api.images import auto_contrast, png_bytes
from smartscope.api.live_render import RECENT_RESULTS, LiveRenders, RecentResults
from smartscope.api.metrics import CONTENT_TYPE, build_registry, metrics_text
from smartscope.api.models import (
    AcquisitionInfo,
    ChannelsInfo,
    Health,
    LatestResult,
    Localization,
    PolicyInfo,
    PolicyUpdate,
    Problem,
    PropertyInfo,
    PropertyValue,
    StartAcquisition,
)
from smartscope.api.stream import STREAM_MESSAGE_DOC, serve_stream
from smartscope.render import to_uint8, write_render_tiff
from smartscope.service import Busy, Daemon, NoWorkers, WrongState
from smartscope.transport.protocol import INDEX_AXES, LOCALIZATION_COLUMNS

_bearer = HTTPBearer(auto_error=False)
DeviceLabel = Annotated[str, Path(description="Micro-Manager device label",
                                  openapi_examples={"laser": {"value": "ActivationLaser"}})]
PropertyName = Annotated[str, Path(description="property name", openapi_examples={"power": {"value": "Power_mW"}})]
PolicyName = Annotated[str, Path(description="policy name (see GET /policies)",
                                 openapi_examples={"illumination": {"value": "illumination"}})]
_TOKEN_IN_URL = re.compile(r"(?i)(token=)[^&\s\"']+")


class _RedactTokens(logging.Filter):
    """Replace `token=...` in log records (uvicorn logs request URLs) by `token=***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(_TOKEN_IN_URL.sub(r"\1***", a) if isinstance(a, str) else a
                                for a in (record.args if isinstance(record.args, tuple) else (record.args,)))
        if isinstance(record.msg, str):
            record.msg = _TOKEN_IN_URL.sub(r"\1***", record.msg)
        return True


def _install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactTokens) for f in logger.filters):
            logger.addFilter(_RedactTokens())


class _BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes (declared or streamed)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                return await self._refuse(scope, receive, send)
            return await self.app(scope, receive, send)
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            return await self.app(scope, receive, send)
        body, more = b"", True  # chunked: read it here (bounded), then replay it
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        response = JSONResponse({"detail": f"request body too large: at most {self.limit} bytes"},
                                status_code=status.HTTP_413_CONTENT_TOO_LARGE)
        await response(scope, receive, send)


_PROBLEMS = {
    401: "missing bearer token",
    403: "wrong bearer token, or no token configured (writes disabled)",
    404: "no such resource (the message says which)",
    409: "conflicts with the acquisition's state (the message says why)",
    413: "request body too large",
    422: "invalid input (the message says what to fix); nothing changed",
}


def _info(run) -> AcquisitionInfo:
    elapsed = (run.finished_s or time.time()) - run.started_s
    return AcquisitionInfo(
        id=run.id, state=run.state, frames_requested=run.n_frames, progress=run.progress(),
        frames_acquired=run.counts.acquired,
        frames_saved=run.frames_saved, frames_inferred=run.inferred,
        frames_dropped=run.counts.dropped_inference,
        acquisition_rate_hz=round(run.counts.acquired / elapsed, 2) if elapsed > 0 else None,
        inference_rate_hz=round(run.inferred / elapsed, 2) if elapsed > 0 else None,
        exposure_ms=run.exposure_ms, interval_ms=run.interval_ms, pauses=run.pauses, started_s=run.started_s,
        finished_s=run.finished_s, error=run.error, out_dir=str(run.out_dir), files=run.files(), summary=run.summary)


def _host_of(url: str) -> str:
    """The host name of an origin or URL (no scheme, port or brackets)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _no_frame_yet(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND,
                         f"no {what} yet: start an acquisition first (POST /acquisitions)")


def create_app(daemon: Daemon, *, token: str | None, protect_reads: bool | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int | None = None) -> FastAPI:
    """The API; protect_reads, cors_origins and max_body_bytes default to the daemon's `api` config."""
    api_cfg = daemon.config.api
    protect_reads = api_cfg.protect_reads if protect_reads is None else protect_reads
    cors_origins = list(api_cfg.cors_origins if cors_origins is None else cors_origins)
    max_body_bytes = api_cfg.max_body_bytes if max_body_bytes is None else max_body_bytes
    _install_log_redaction()

    def check_token(supplied: str | None) -> None:
        if token is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                "writes are disabled: no API token configured (set SMARTSCOPE_TOKEN)")
        if not supplied:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(supplied.encode(), token.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "wrong bearer token")

    def require_token(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        check_token(creds.credentials if creds is not None else None)

    def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {code: {"model": Problem, "description": _PROBLEMS[code]} for code in codes}

    read_deps = [Depends(require_token)] if protect_reads else []
    reads = APIRouter(dependencies=read_deps, responses=problems(404, 422, *((401, 403) if protect_reads else ())))
    writes = APIRouter(dependencies=[Depends(require_token)], responses=problems(401, 403, 404, 409, 413, 422))
    app = FastAPI(
        title="smartscope", version="0.1.0", docs_url=None, redoc_url=None,  # served offline by add_console
        description="Control API of a smart microscope: acquisitions, devices, policies, decisions, results, "
                    "metrics.\n\nWrites need `Authorization: Bearer <token>`"
                    + ("; so do reads." if protect_reads else "; reads are open.")
                    + "\n\nLive stream (WebSocket, not listed below): " + STREAM_MESSAGE_DOC)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    allowed_hosts = api_cfg.resolved_allowed_hosts()
    if "*" not in allowed_hosts:  # DNS rebinding: a hostile name resolving to 127.0.0.1 is refused by its Host
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    registry = build_registry(daemon)

    @app.get("/health", tags=["status"], response_model=Health)
    def health() -> Health:
        return Health()

    @reads.get("/status", tags=["status"])
    def get_status() -> dict[str, Any]:
        """State, counts, workers, actuator values and the newest per-frame summary."""
        return daemon.status()

    @reads.get("/metrics", tags=["status"], response_class=Response,
               responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                "description": "Prometheus text exposition format"}})
    def metrics() -> Response:
        """Counters (frames, drops, decisions, moves), latency histogram, workers by provider."""
        return Response(metrics_text(registry), media_type=CONTENT_TYPE)

    # -- acquisitions ----------------------------------------------------------

    @writes.post("/acquisitions", status_code=201, tags=["acquisitions"], response_model=AcquisitionInfo)
    def start(body: StartAcquisition) -> AcquisitionInfo:
        """Start an acquisition (one at a time); files go to `storage.root/<name or id>`."""
        out_dir = daemon.storage_root / body.name if body.name else None
        if out_dir is not None and any((out_dir / f).exists() for f in ("frames.csv", "summary.json")):
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"{out_dir} already holds an acquisition: choose another name")
        try:
            run = daemon.start_acquisition(out_dir, body.frames,
                                           exposure_ms=body.exposure_ms, interval_ms=body.interval_ms,
                                           sequence=body.sequence, policies=body.policies,
                                           require_workers=body.require_workers)
        except Busy as e:
            raise HTTPException(status.HTTP_409_CONFLICT, {"message": str(e), "running": e.running_id}) from e
        except NoWorkers as e:
            raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from e
        except ValueError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        return _info(run)

    @writes.post("/acquisitions/current/stop", tags=["acquisitions"], response_model=AcquisitionInfo)
    def stop() -> AcquisitionInfo:
        """Cancel the running acquisition (files are closed and complete); waits until it has ended."""
        run = daemon.stop_acquisition()
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no acquisition has run yet")
        return _info(run)

    @writes.post("/acquisitions/current/pause", tags=["acquisitions"], response_model=AcquisitionInfo)
    def pause() -> AcquisitionInfo:
        """Stop the camera (no frame lost) and set the lasers to their safe value until resumed."""
        return _change_state(daemon.pause_acquisition)

    @writes.post("/acquisitions/current/resume", tags=["acquisitions"], response_model=AcquisitionInfo)
    def resume() -> AcquisitionInfo:
        """Lasers back to their values before the pause, camera restarted for the remaining frames."""
        return _change_state(daemon.resume_acquisition)

    def _change_state(change) -> AcquisitionInfo:
        """Pause or resume: no acquisition → 404, not in a state that allows it → 409."""
        try:
            return _info(change())
        except LookupError as e:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from e
        except WrongState as e:
            raise HTTPException(status.HTTP_409_CONFLICT, str(e)) from e

    @reads.get("/acquisitions", tags=["acquisitions"], response_model=list[AcquisitionInfo])
    def list_runs() -> list[AcquisitionInfo]:
        """Every run the daemon knows (the newest 1000), each summary without its sequence (GET /acquisitions/{id}
        has it)."""
        return [_info(r) for r in list(daemon.runs.values())]

    @reads.get("/acquisitions/{run_id}", tags=["acquisitions"], response_model=AcquisitionInfo)
    def get_run(run_id: str) -> AcquisitionInfo:
        run = daemon.runs.get(run_id)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no acquisition {run_id!r}")
        info = _info(run)
        if run.done.is_set():  # the whole summary, its sequence too, from summary.json (the list keeps it short)
            try:
                info.summary = json.loads((run.out_dir / "summary.json").read_text())
            except (OSError, ValueError):
                pass
        return info

    # -- results ---------------------------------------------------------------

    @reads.get("/results/latest", tags=["results"], response_model=LatestResult)
    def latest_result() -> LatestResult:
        """The newest inference result: localizations, emitter count, event score, focus estimate."""
        latest = daemon.latest_result
        if latest is None:
            raise _no_frame_yet("inference result")
        return _result_body(latest)

    def _result_body(latest: dict[str, Any]) -> LatestResult:
        run = daemon.runs.get(latest["acquisition"])
        locs = np.asarray(latest["localizations"], dtype=float).reshape(-1, len(LOCALIZATION_COLUMNS))
        return LatestResult(
            **{k: v for k, v in latest.items() if k != "localizations"},
            frames_acquired=run.counts.acquired if run else 0, frames_inferred=run.inferred if run else 0,
            localizations_total=run.localizations if run else 0,
            localizations=[Localization(**dict(zip(LOCALIZATION_COLUMNS, map(float, row), strict=True)))
                           for row in locs])

    recent_results = RecentResults()
    daemon.subscribe(lambda: recent_results.add(daemon.latest_result))

    @reads.get("/results/{frame}", tags=["results"], response_model=LatestResult)
    def result_of_frame(frame: Annotated[int, Path(ge=0, description="frame number (X-Frame of /frames/latest.png)")],
                        acquisition: Annotated[str | None, Query(description="default: the current one")] = None,
                        ) -> LatestResult:
        """The inference result of one recent frame (the last RECENT_RESULTS kept), so that a frame and its own
        localizations can be shown together; 404 for a frame not inferred (skipped under load, a channel the
        models do not read) or no longer kept."""
        acquisition = acquisition or (daemon.run.id if daemon.run else None)
        result = recent_results.get(acquisition, frame)
        if result is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"no result for frame {frame} of acquisition {acquisition!r} among the last "
                                f"{RECENT_RESULTS}: not inferred (skipped under load, or a channel the models do "
                                "not read), not yet, or no longer kept")
        return _result_body(result)

    @reads.get("/frames/latest.png", tags=["results"], response_class=Response,
               responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                                "description": "8-bit PNG, percentile stretch; headers X-Frame, X-Acquisition, "
                                               "X-Index (the MDA index and channel name, JSON)"}})
    def latest_frame(low_percentile: Annotated[float, Query(ge=0, le=50)] = 0.5,
                     high_percentile: Annotated[float, Query(ge=50, le=100)] = 99.5) -> Response:
        """The newest frame for a quick look (auto-contrast: percentiles stretched to black..white)."""
        latest = daemon.latest_frame
        if latest is None:
            raise _no_frame_yet("frame")
        if not low_percentile < high_percentile:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "low_percentile must be below high_percentile")
        frame, state = latest
        run = daemon.run
        index = {k: state.get(k) for k in (*INDEX_AXES, "channel") if k in state}
        return Response(png_bytes(auto_contrast(frame, low_percentile, high_percentile)), media_type="image/png",
                        headers={"X-Frame": str(state.get("frame")), "Cache-Control": "no-store",
                                 "X-Index": json.dumps(index),
                                 "X-Acquisition": run.id if run else ""})

    renders = LiveRenders()

    def _run_or_404(run_id: str):
        run = daemon.runs.get(run_id)
        if run is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no acquisition {run_id!r} (see GET /acquisitions)")
        return run

    @reads.get("/acquisitions/{run_id}/render.{fmt}", tags=["acquisitions"], response_class=Response,
               responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                                            "image/tiff": {"schema": {"type": "string", "format": "binary"}}},
                                "description": "png: 8-bit view; tif: float32 localizations per pixel, ImageJ "
                                               "TIFF with the pixel size. Headers X-Localizations, X-Extent-Nm "
                                               "(x0,y0,x1,y1), X-Field-Nm (the camera field), X-Pixel-Nm"}})
    def render(run_id: str, fmt: Literal["png", "tif"],
               pixel_nm: Annotated[float, Query(ge=0.5, le=10_000, description="render pixel size")] = 10.0,
               blur_nm: Annotated[float | None, Query(ge=0, le=10_000, description="Gaussian σ; default: "
                                                      "the render pixel, at least 10 nm")] = None,
               x0_nm: Annotated[float | None, Query(description="region (all four or none); default: "
                                                    "the camera field")] = None,
               y0_nm: float | None = None, x1_nm: float | None = None, y1_nm: float | None = None,
               colour_by_z: Annotated[bool, Query(description="RGB, coloured by z over the run's z range")] = False,
               position: Annotated[int | None, Query(ge=0, description="only this MDA stage position")] = None,
               channel: Annotated[int | None, Query(ge=0, description="only this MDA channel (index)")] = None,
               saturate_percentile: Annotated[float, Query(ge=50, le=100, description="png: the percentile "
                                                           "of lit pixels shown white")] = 99.5) -> Response:
        """The run's localizations so far as a super-resolution image (Gaussian-blurred histogram), live while
        it runs; the same renderer as `smartscope render`."""
        run = _run_or_404(run_id)
        field_nm = (0.0, 0.0, daemon.core.getImageWidth() * daemon.camera.pixel_size_nm,
                    daemon.core.getImageHeight() * daemon.camera.pixel_size_nm)
        region = (x0_nm, y0_nm, x1_nm, y1_nm)
        if all(v is None for v in region):
            extent = field_nm
        elif any(v is None for v in region) or not (x1_nm > x0_nm and y1_nm > y0_nm):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                                "give all of x0_nm, y0_nm, x1_nm, y1_nm with x1_nm > x0_nm and y1_nm > y0_nm, "
                                "or none (the camera field)")
        else:
            extent = region
        try:
            image, n = renders.render(run.id, run.out_dir, extent, pixel_nm, blur_nm, colour_by_z, position, channel)
        except ValueError as e:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        headers = {"X-Localizations": str(n), "X-Extent-Nm": ",".join(f"{v:g}" for v in extent),
                   "X-Field-Nm": ",".join(f"{v:g}" for v in field_nm), "X-Pixel-Nm": f"{pixel_nm:g}",
                   "Cache-Control": "no-store"}
        if fmt == "png":
            return Response(png_bytes(to_uint8(image, saturate_percentile)), media_type="image/png", headers=headers)
        buf = io.BytesIO()
        write_render_tiff(buf, image, pixel_nm)
        return Response(buf.getvalue(), media_type="image/tiff", headers={
            **headers, "Content-Disposition": f'attachment; filename="{run.id}-render.tif"'})

    @reads.get("/acquisitions/{run_id}/report.png", tags=["acquisitions"], response_class=FileResponse,
               responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                                "description": "the run's report figure (drawn when it ends)"}})
    def report(run_id: str) -> FileResponse:
        run = _run_or_404(run_id)
        path = run.out_dir / "report.png"
        if not path.exists():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"acquisition {run_id!r} has no report: "
                                + (run.report_error or "it is drawn when the run ends"))
        return FileResponse(path, media_type="image/png")

    # -- devices ---------------------------------------------------------------

    core = daemon.core

    def _check_property(label: str, prop: str) -> None:
        if label not in core.getLoadedDevices():
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no device {label!r}")
        if not core.hasProperty(label, prop):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"device {label!r} has no property {prop!r}")

    @reads.get("/channels", tags=["devices"], response_model=ChannelsInfo)
    def channels() -> ChannelsInfo:
        """The channel group a plan's `channels` name presets of, its presets and the current one."""
        group = core.getChannelGroup()
        if not group:
            return ChannelsInfo(group=None, presets=[], current=None)
        return ChannelsInfo(group=group, presets=list(core.getAvailableConfigs(group)),
                            current=core.getCurrentConfig(group) or None)

    @reads.get("/devices", tags=["devices"])
    def devices() -> dict[str, dict[str, Any]]:
        """Every device with its properties: value, read-only, limits and allowed values."""
        out: dict[str, dict[str, Any]] = {}
        for label in core.getLoadedDevices():
            props = {}
            for prop in core.getDevicePropertyNames(label):
                entry: dict[str, Any] = {"value": core.getProperty(label, prop),
                                         "type": str(core.getPropertyType(label, prop)),
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

    @reads.get("/devices/{label}/properties/{prop}", tags=["devices"], response_model=PropertyInfo)
    def get_property(label: DeviceLabel, prop: PropertyName) -> PropertyInfo:
        _check_property(label, prop)
        return PropertyInfo(device=label, property=prop, value=core.getProperty(label, prop))

    @writes.put("/devices/{label}/properties/{prop}", tags=["devices"], response_model=PropertyInfo)
    def set_property(label: DeviceLabel, prop: PropertyName, body: PropertyValue) -> PropertyInfo:
        """Set a property; outside its limits, allowed values or the safety envelope: 422, unchanged."""
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
            daemon.set_actuator(actuator, float(value), source="api")
        else:
            try:
                core.setProperty(label, prop, value)
            except Exception as e:  # Micro-Manager's own refusal, passed on
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from e
        return PropertyInfo(device=label, property=prop, value=core.getProperty(label, prop))

    # -- policies --------------------------------------------------------------

    def _policy_info(name: str) -> PolicyInfo:
        slot = daemon.engine.slots[name]
        pol = slot.policy
        return PolicyInfo(name=name, module=slot.module, enabled=slot.enabled, actuators=list(pol.actuators),
                          params=pol.params.model_dump(), params_schema=pol.Params.model_json_schema())

    @reads.get("/policies", tags=["policies"], response_model=list[PolicyInfo])
    def policies() -> list[PolicyInfo]:
        return [_policy_info(n) for n in daemon.engine.slots]

    @reads.get("/policies/{name}", tags=["policies"], response_model=PolicyInfo)
    def get_policy(name: PolicyName) -> PolicyInfo:
        if name not in daemon.engine.slots:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"no policy {name!r}; known: {sorted(daemon.engine.slots)}")
        return _policy_info(name)

    @writes.patch("/policies/{name}", tags=["policies"], response_model=PolicyInfo)
    def update_policy(name: PolicyName, body: PolicyUpdate) -> PolicyInfo:
        """Enable/disable and change parameters: all validated first, then applied as one step."""
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
        """Recent decisions, newest last; `offset` counts back from the newest."""
        return daemon.decisions.recent(limit, offset)

    # -- live stream -------------------------------------------------------------

    @app.websocket("/stream")
    async def stream(websocket: WebSocket, max_rate_hz: Annotated[float, Query(gt=0, le=100)] = 10.0,
                     token: Annotated[str | None, Query()] = None) -> None:
        origin = websocket.headers.get("origin")
        if origin is not None and origin not in cors_origins and _host_of(origin) not in allowed_hosts:
            # a page of another site open in the user's browser: browsers send its Origin and let it connect
            await websocket.send_denial_response(JSONResponse(
                {"detail": f"origin {origin} is not allowed (api.cors_origins, api.allowed_hosts)"}, status_code=403))
            return
        if protect_reads:
            supplied = token
            header = websocket.headers.get("authorization", "")
            if supplied is None and header.lower().startswith("bearer "):
                supplied = header[7:].strip()
            try:
                check_token(supplied)
            except HTTPException as e:
                await websocket.send_denial_response(
                    JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers))
                return
        await serve_stream(websocket, daemon, max_rate_hz)

    app.include_router(reads)
    app.include_router(writes)
    add_console(app)

    return app
