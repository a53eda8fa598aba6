"""Where the shipped models and configs live, in a checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def bundled_path(name: str) -> Path:
    """`models` or `configs`: the checkout's top-level folder, else the wheel's copy."""
    checkout = _PACKAGE_DIR.parent / name
    if checkout.is_dir():
        return checkout
    return _PACKAGE_DIR / "_bundled" / name


def resolve_model_path(model: str) -> Path:
    """A model given as a path, or as a file name inside the shipped models folder."""
    candidate = Path(model)
    if candidate.is_file():
        return candidate
    return bundled_path("models") / model
