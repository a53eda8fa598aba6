"""The browser console at `/` and the API docs at `/docs`, both served without a network.

The console is static files shipped in the package (`static/`: plain HTML, JS and
canvas, no build step); it uses only the public API and `WS /stream`. Swagger UI
comes from the `fastapi-offline` package's bundled assets instead of a CDN, so an
offline lab still gets its API documentation. (No ReDoc page: its bundle fetches
its logo from a CDN.)
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = files("smartscope.api") / "static"
_DOCS_ASSETS = files("fastapi_offline") / "static"


def add_console(app: FastAPI) -> None:
    """Mount the console at `/` (assets under `/console/`) and the offline docs (`FastAPI(docs_url=None,
    redoc_url=None)` first, so the CDN pages are not there as well)."""
    app.mount("/console", StaticFiles(directory=str(STATIC_DIR)), name="console")
    app.mount("/docs-assets", StaticFiles(directory=str(_DOCS_ASSETS)), name="docs-assets")

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(str(STATIC_DIR / "index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} – API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png")
