"""Filtering: keep the localizations bright and precise enough to trust."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartscope.analysis.table import PHOTONS, UNC, select


class FilterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_photons: float | None = Field(None, ge=0, description="drop rows with fewer photons; None: no limit")
    max_photons: float | None = Field(None, gt=0, description="drop rows with more photons (e.g. two emitters)")
    max_uncertainty_nm: float | None = Field(None, gt=0, description="drop rows less precise than this")


def filter_table(table: dict[str, np.ndarray], settings: FilterSettings) -> dict[str, np.ndarray]:
    keep = np.ones(len(table["frame"]), bool)
    if settings.min_photons is not None:
        keep &= table[PHOTONS] >= settings.min_photons
    if settings.max_photons is not None:
        keep &= table[PHOTONS] <= settings.max_photons
    if settings.max_uncertainty_nm is not None:
        keep &= table[UNC] <= settings.max_uncertainty_nm
    return select(table, keep)
