"""The FastAPI control API."""

from smartscope.api.app import create_app

__all__ = ["create_app"]
