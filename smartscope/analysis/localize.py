"""Localize one chunk of a stack with the shipped model, exactly as the whole stack would be.

The model localizes frame t from the causal window t-2..t (the card's
`frames`). A chunk [start, stop) therefore reads from start - (frames - 1):
the frames before its edge are carried into its first windows, so a frame is
localized the same whichever chunk it falls in, and chunked and whole runs
give identical tables. Frames go through the network in batches aligned to
absolute frame numbers (multiples of BATCH_FRAMES), so a batch is the same
whatever the chunking too. The model is loaded once per process (a Dask
worker keeps it between chunks).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartscope.analysis.sources import Stack, read_frames
from smartscope.analysis.table import empty_table, table_from_rows
from smartscope.inference.localization import frame_to_photons, maps_to_localizations, prepare_frame
from smartscope.inference.session import LoadedModel, load_model
from smartscope.transport.protocol import CameraParams

BATCH_FRAMES = 8


class LocalizeSettings(BaseModel):
    """How frames become localizations: the camera calibration, the model and its threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pixel_size_nm: float | None = Field(None, gt=0, description="None: from each stack's metadata")
    adu_per_electron: float = Field(2.0, gt=0)
    offset_adu: float = 100.0
    qe: float = Field(0.8, gt=0, le=1)
    em_gain: float = Field(1.0, gt=0)
    read_noise_e: float = Field(0.0, ge=0, description="rms read noise (electrons, sCMOS): in the fit's likelihood")
    model: str = "localization.onnx"
    threshold: float = Field(0.5, gt=0, lt=1)
    provider: str = "cpu"
    chunk_frames: int = Field(1000, ge=1, description="frames per task: the unit of work, of memory and of resume")

    def camera(self, pixel_size_nm: float) -> CameraParams:
        return CameraParams(pixel_size_nm=pixel_size_nm, offset_adu=self.offset_adu,
                            e_per_adu=1.0 / self.adu_per_electron, qe=self.qe, em_gain=self.em_gain,
                            read_noise_e=self.read_noise_e)


@lru_cache(maxsize=2)
def model_for(model: str, provider: str, threads: int | None) -> LoadedModel:
    """The model, loaded once per process (a Dask worker keeps it between chunks). Its results do not
    depend on the thread count or the batch size: a chunk localized anywhere gives the same table."""
    return load_model(model, provider, threads=threads)


def chunk_starts(n_frames: int, chunk_frames: int) -> list[int]:
    return list(range(0, n_frames, chunk_frames))


def localize_chunk(stack: Stack, start: int, stop: int, settings: LocalizeSettings, pixel_size_nm: float,
                   threads: int | None = None) -> dict[str, np.ndarray]:
    """Localizations of frames [start, stop) of `stack` (a table, see analysis/table.py).

    Frames are read, converted and run one batch at a time (the window's earlier frames kept), so
    memory does not grow with the chunk. `threads`: the model's intra-op threads (None: one per core).
    """
    model = model_for(settings.model, settings.provider, threads)
    card = model.card
    window = int(card.get("frames", 1))
    camera = settings.camera(pixel_size_nm)

    def prepared(first: int, last: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        frames = read_frames(stack, first, last)
        photons = [frame_to_photons(f, camera) for f in frames]
        return frames, photons, [prepare_frame(p, card) for p in photons]

    history = prepared(max(0, start - window + 1), start)[2] if start else []
    rows: list[np.ndarray] = []
    frame_ids: list[np.ndarray] = []
    t = start
    while t < stop:
        batch_stop = min(stop, (t // BATCH_FRAMES + 1) * BATCH_FRAMES)
        frames, photons, batch = prepared(t, batch_stop)
        seen = history + batch
        inputs = []
        for i in range(len(history), len(seen)):
            win = seen[max(0, i - window + 1):i + 1]
            inputs.append(np.stack([win[0]] * (window - len(win)) + win))  # stack start: copies of frame 0
        maps = model.run(np.stack(inputs))
        for k in range(len(batch)):
            locs, _ = maps_to_localizations(card, maps[k:k + 1], photons[k], frames.shape[1:], camera,
                                            threshold=settings.threshold)
            rows.append(locs)
            frame_ids.append(np.full(len(locs), t + k, np.int64))
        history = seen[len(seen) - window + 1:] if window > 1 else []
        t = batch_stop
    if not sum(len(r) for r in rows):
        return empty_table()
    return table_from_rows(np.concatenate(frame_ids), np.concatenate(rows))
