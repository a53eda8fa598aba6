"""Large frames as overlapping tiles: cut, localize each tile, merge, equal to the whole frame.

A frame too large for one inference worker to keep up with is cut into tiles
that several workers localize in parallel. Each tile owns a *core*; the cores
partition the frame. Around its core a tile reads a *margin* wide enough that
everything decided about a localization in the core sees the same pixels as
in the whole frame:

- the network's receptive field (`receptive_field`, from the ONNX graph or
  measured by impulse response), so that its maps over the core and a little
  around it are the whole frame's;
- what decoding looks at around a localization (`decode_context_px`): the 3×3
  peak test, and the maximum-likelihood refinement's neighbour test and window.

Margins are clipped at the frame edge, where the tile then sees exactly what
the whole frame sees (the same zero padding in the network, the same edge
padding to the stride: tile origins are multiples of the network's stride).
Per-frame statistics (the fill value of NaN pixels, the normalisation median,
the decoding background) are the whole frame's, computed once per frame
(`frame_statistics`) and carried with each tile (`TileJob`): a tile's own
median would shift its input. A localization is kept by the tile whose core
holds its position (`merge`), so each is kept exactly once, and the merged
table lists them in the whole frame's order (by the pixel each was found at).

The pieces are pure functions over numpy and a `LoadedModel`; `TilePool` runs
the tiles of a frame on worker processes (one ONNX Runtime session each),
for offline analysis and benchmarks. Live, the daemon's frame sender cuts a
large frame (`FrameTiler`: one frame message per tile, its header carrying a
`TilePart` with the whole frame's statistics), each tile goes to whichever
worker asks for a frame next, the worker localizes it (`prepare_frame` +
its own batching + `decode_tile`, keeping what its core owns), and the
daemon's results thread gathers the tiles of each frame and merges them with
the same `merge` (`TileGather`) before the frame's result is recorded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from smartscope.inference.localization import (
    frame_background,
    frame_to_photons,
    localize_maps,
    pad_to_stride,
    prepare_frame,
    window_input,
)
from smartscope.inference.refine import ISOLATION_PX, refine_positions
from smartscope.inference.session import LoadedModel, fill_non_finite, load_model
from smartscope.transport.protocol import LOCALIZATION_COLUMNS, FrameHeader, MalformedMessage, Result, TilePart

# -- how far a pixel's result depends on other pixels --------------------------------------------------------------

#: ops that act on each pixel alone (any channel mixing, no spatial reach)
_POINTWISE = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "Tanh", "Softplus", "Clip",
              "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Exp", "Log", "Abs", "Neg", "Identity", "Cast",
              "BatchNormalization", "Dropout", "Erf", "Gelu", "HardSwish", "Sign", "Min", "Max", "Where",
              "QuantizeLinear", "DequantizeLinear"}  # int8 variants (QDQ format): per-pixel too


@dataclass(frozen=True)
class ReceptiveField:
    """Input pixels an output pixel depends on: rows / columns [q - before_px, q + after_px] for output pixel q,
    wherever q lies relative to the downsampling grid (`stride_px`, the largest downsampling inside the net)."""

    before_px: int
    after_px: int
    stride_px: int

    @property
    def reach_px(self) -> int:
        return max(self.before_px, self.after_px)


def graph_receptive_field(onnx_path: str | Path) -> ReceptiveField:
    """The receptive field from the ONNX graph (needs the `onnx` package: `smartscope[train]`).

    Walks the graph from the input, keeping for each tensor its spacing on the
    input grid (`jump`) and the offsets [lo, hi] of the input pixels one of its
    pixels reads: convolution and pooling widen them by their kernel, stride
    and padding; nearest/linear resizing by the pixels it reads; joins take the
    widest. Ops that mix the whole image (global pooling, normalisation over
    H, W, reshapes) raise ValueError: such a network cannot be tiled exactly.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    # per tensor: (jump px, lo px, hi px), the same on both spatial axes (square kernels are checked)
    fields: dict[str, tuple[float, float, float]] = {
        i.name: (1.0, 0.0, 0.0) for i in graph.input if i.name not in consts}
    stride = 1.0
    for node in graph.node:
        spatial = [fields[i] for i in node.input if i in fields]
        if not spatial:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op in ("Conv", "MaxPool", "AveragePool", "ConvTranspose"):
            j, lo, hi = spatial[0]
            kernel = attrs.get("kernel_shape") or list(consts[node.input[1]].shape[2:])
            strides, dilations = attrs.get("strides", [1, 1]), attrs.get("dilations", [1, 1])
            pads = attrs.get("pads", [0, 0, 0, 0])
            if len(set(kernel)) != 1 or len(set(strides)) != 1 or len(set(dilations)) != 1 or \
                    len(set(pads[:2])) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
                raise ValueError(f"{onnx_path}: {op} {node.name} with unequal axes or auto_pad: not supported")
            k, s, d, p = kernel[0], strides[0], dilations[0], pads[0]
            reach = (k - 1) * d
            if op == "ConvTranspose":  # output q reads inputs (q + p - t d) / s, t = 0..k-1
                j = j / s
                fields[node.output[0]] = (j, lo + (p - reach) * j, hi + p * j)
            else:  # output q reads inputs q s - p + t d
                fields[node.output[0]] = (j * s, lo - p * j, hi + (reach - p) * j)
                stride = max(stride, j * s)
        elif op in ("Resize", "Upsample"):
            j, lo, hi = spatial[0]
            scales = next((consts[i] for i in node.input[1:] if i in consts and consts[i].size == 4
                           and consts[i].dtype.kind == "f"), None)
            if scales is None or scales[2] != scales[3] or scales[2] < 1:
                raise ValueError(f"{onnx_path}: {op} {node.name} without constant, equal upscaling: not supported")
            f = float(scales[2])
            j_out = j / f
            exact = attrs.get("mode", b"nearest") == b"nearest" and attrs.get("nearest_mode", b"") == b"floor" \
                and attrs.get("coordinate_transformation_mode", b"") == b"asymmetric"
            # floor(q / f) reads the input pixel at or left of q; other modes read one input pixel either side
            fields[node.output[0]] = (j_out, lo - (f - 1) * j_out, hi) if exact else (j_out, lo - j, hi + j)
        elif op in _POINTWISE or (op == "Concat" and attrs.get("axis") == 1) or \
                (op == "Softmax" and attrs.get("axis") == 1) or (op == "Slice" and _slices_channels(node, consts)):
            jumps = {s[0] for s in spatial}
            if len(jumps) != 1:
                raise ValueError(f"{onnx_path}: {op} {node.name} joins tensors of different resolutions")
            fields[node.output[0]] = (jumps.pop(), min(s[1] for s in spatial), max(s[2] for s in spatial))
        else:
            raise ValueError(f"{onnx_path}: {op} {node.name} mixes pixels in a way tiling cannot bound")
    outs = [fields[o.name] for o in graph.output]
    if any(o[0] != 1.0 for o in outs):
        raise ValueError(f"{onnx_path}: outputs are not at the input's resolution")
    return ReceptiveField(int(math.ceil(-min(o[1] for o in outs))), int(math.ceil(max(o[2] for o in outs))),
                          int(stride))


def _slices_channels(node: Any, consts: dict[str, np.ndarray]) -> bool:
    """A Slice whose axes are all the channel axis (1): no pixel moves."""
    axes = consts.get(node.input[3]) if len(node.input) > 3 else None
    return axes is not None and set(np.atleast_1d(axes).tolist()) == {1}


def measure_receptive_field(model: LoadedModel, size_px: int = 128) -> ReceptiveField:
    """The receptive field measured through ONNX Runtime: the output pixels one changed input pixel changes.

    A random input, then the same with one pixel raised (and lowered) at each
    phase of the downsampling grid; the extent of the changed outputs gives
    how far before and after a pixel the network reads. A measurement can
    only miss a dependency (a unit that stays off), never invent one: the
    graph's figure (`graph_receptive_field`) is the bound, this checks it.
    """
    multiple = int(model.card.get("input_multiple_px", 1))
    frames = int(model.card.get("frames", 1))
    rng = np.random.default_rng(0)
    while True:
        base = rng.normal(0.0, 1.0, (1, frames, size_px, size_px)).astype(np.float32)
        ref = model.run(base)
        before = after = 0
        centre = size_px // 2 // multiple * multiple
        for phase in range(multiple):
            for delta in (10.0, -10.0):
                c = centre + phase
                probe = base.copy()
                probe[:, :, c, c] += delta
                changed = np.nonzero((model.run(probe) != ref).any(axis=(0, 1)))
                if len(changed[0]):
                    lo, hi = min(changed[0].min(), changed[1].min()), max(changed[0].max(), changed[1].max())
                    before, after = max(before, hi - c), max(after, c - lo)
        if max(before, after) < size_px // 2 - multiple:
            return ReceptiveField(int(before), int(after), multiple)
        size_px *= 2  # the change reached the edge: measure on a larger input


_fields: dict[Path, ReceptiveField] = {}


def receptive_field(model: LoadedModel) -> ReceptiveField:
    """The model's receptive field (once per model file): from its graph where the `onnx` package is installed,
    else measured (tests/test_tiling.py checks that the two agree on the shipped models)."""
    if model.path not in _fields:
        try:
            import onnx  # noqa: F401
        except ImportError:
            _fields[model.path] = measure_receptive_field(model)
        else:
            _fields[model.path] = graph_receptive_field(model.path)
    return _fields[model.path]


def decode_context_px() -> int:
    """How far from a localization's position decoding reads the maps and the other localizations.

    The peak test compares a pixel with its 8 neighbours (1 px); refinement
    fits only a detection with no comparably bright other within ISOLATION_PX
    (7 px) and reads its window (9 px); a position lies up to ~1.1 px from its
    peak pixel (the shipped models' offset is tanh × 0.6 px) and refinement
    moves it < 1 px.
    """
    window_px = refine_positions.__kwdefaults__["window_px"]
    return 1 + max(window_px, math.ceil(ISOLATION_PX)) + 1 + 2


def tile_margin_px(model: LoadedModel, field: ReceptiveField | None = None) -> int:
    """The margin each tile reads around its core: receptive field + decoding context, on the stride grid."""
    field = field or receptive_field(model)
    multiple = math.lcm(int(model.card.get("input_multiple_px", 1)), field.stride_px)
    return math.ceil((field.reach_px + decode_context_px()) / multiple) * multiple


# -- the plan ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One tile of a (height, width) frame: the pixels it reads [y0, y1) × [x0, x1) (core + margin, clipped at
    the frame edge) and the core it owns [core_y0, core_y1) × [core_x0, core_x1); all in frame pixels."""

    y0: int
    y1: int
    x0: int
    x1: int
    core_y0: int
    core_y1: int
    core_x0: int
    core_x1: int
    frame_shape: tuple[int, int]

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def owns(self, x_nm: np.ndarray, y_nm: np.ndarray, pixel_size_nm: float) -> np.ndarray:
        """Which positions (frame nm) lie in this core; a position off the frame belongs to the edge's core."""
        h, w = self.frame_shape
        col = np.clip(np.floor(np.asarray(x_nm) / pixel_size_nm), 0, w - 1)
        row = np.clip(np.floor(np.asarray(y_nm) / pixel_size_nm), 0, h - 1)
        return (row >= self.core_y0) & (row < self.core_y1) & (col >= self.core_x0) & (col < self.core_x1)


def _split(length_px: int, core_px: int, multiple_px: int) -> list[tuple[int, int]]:
    """[0, length) in near-equal runs of at most ~core_px, each starting on the multiple_px grid."""
    n = max(1, math.ceil(length_px / core_px))
    step = math.ceil(math.ceil(length_px / n) / multiple_px) * multiple_px
    return [(start, min(start + step, length_px)) for start in range(0, length_px, step)]


def plan_tiles(shape_px: tuple[int, int], core_px: int | tuple[int, int], margin_px: int,
               multiple_px: int = 1) -> list[Tile]:
    """Tiles of a (height, width) frame, row by row: cores of about `core_px` (rows, cols) that partition the frame,
    each read with `margin_px` around it, clipped at the frame edge.

    Core edges and margins are on the `multiple_px` grid (the network's stride,
    see `tile_margin_px`), so a tile's origin is on the whole frame's pooling
    grid and its pixels meet the network as they do in the whole frame.
    """
    if margin_px % multiple_px:
        raise ValueError(f"margin {margin_px} px is not a multiple of the network's {multiple_px} px stride")
    h, w = shape_px
    core_h, core_w = (core_px, core_px) if isinstance(core_px, int) else core_px
    tiles = []
    for cy0, cy1 in _split(h, core_h, multiple_px):
        for cx0, cx1 in _split(w, core_w, multiple_px):
            tiles.append(Tile(max(0, cy0 - margin_px), min(h, cy1 + margin_px), max(0, cx0 - margin_px),
                              min(w, cx1 + margin_px), cy0, cy1, cx0, cx1, (h, w)))
    return tiles


# -- per-frame statistics, cutting, localizing, merging ------------------------------------------------------------


@dataclass(frozen=True)
class FrameStatistics:
    """What the per-frame pipeline computes over the whole frame (photons/px), carried with each tile."""

    fill_photons: float  # non-finite pixels become this (`fill_non_finite`)
    median_photons: float  # the normalisation median of the filled frame, padded to the stride (`normalise`)
    background_photons: float  # the decoding background (`frame_background`)


def frame_statistics(photons: np.ndarray, card: dict[str, Any]) -> FrameStatistics:
    """(H, W) photons of a whole frame → the statistics its tiles need, exactly as `prepare_frame` and
    `maps_to_localizations` compute them on the whole frame."""
    filled = fill_non_finite(photons)
    finite = np.isfinite(photons)
    padded = pad_to_stride(filled, card)
    if finite.all() and padded.shape == filled.shape and card["normalisation"].get("subtract_median"):
        median = float(np.median(filled))  # the same pixels: one median serves both (a median costs ~10 ms/Mpx)
        return FrameStatistics(0.0, median, median)
    fill = float(filled[~finite][0]) if not finite.all() else 0.0
    median = float(np.median(padded)) if card["normalisation"].get("subtract_median") else 0.0
    return FrameStatistics(fill, median, frame_background(photons))


@dataclass(frozen=True)
class TileJob:
    """Everything a worker needs to localize one tile of one frame: the tile, the window's crops (T, h, w) in
    photons (oldest first, the frame to localize last) and each window frame's whole-frame statistics."""

    tile: Tile
    photons: np.ndarray
    stats: tuple[FrameStatistics, ...]


def cut(photons: np.ndarray, stats: list[FrameStatistics], tiles: list[Tile]) -> list[TileJob]:
    """A (T, H, W) window of whole frames (photons, oldest first) and their statistics → one job per tile."""
    window = np.asarray(photons)
    window = window[None] if window.ndim == 2 else window
    if len(stats) != len(window):
        raise ValueError(f"{len(stats)} frame statistics for a window of {len(window)} frames")
    return [TileJob(t, np.ascontiguousarray(window[(slice(None), *t.slices)]), tuple(stats)) for t in tiles]


@dataclass(frozen=True)
class TileResult:
    """One tile's localizations (N, 7: LOCALIZATION_COLUMNS) in frame nm, and the frame pixel each was detected
    at (row × frame width + column of its peak): the whole frame lists its localizations in that order."""

    locs: np.ndarray
    peak_px: np.ndarray


def localize_tile(model: LoadedModel, job: TileJob, camera: Any, *, threshold: float,
                  refine: bool = True) -> TileResult:
    """One tile → all its localizations, core and margin; `merge` keeps the core's."""
    card = model.card
    prepared = [prepare_frame(f, card, fill_photons=s.fill_photons, median_photons=s.median_photons)
                for f, s in zip(job.photons, job.stats, strict=True)]
    maps = model.run(window_input(prepared, card)[None])
    return decode_tile(card, maps, job.tile, job.photons[-1], job.stats[-1], camera, threshold=threshold,
                       refine=refine)


def decode_tile(card: dict[str, Any], maps: np.ndarray, tile: Tile, photons: np.ndarray, stats: FrameStatistics,
                camera: Any, *, threshold: float, refine: bool = True) -> TileResult:
    """One tile's network maps (1, C, h', w') and its (h, w) photons of the frame localized → its result in frame
    coordinates: `localize_maps` with the whole frame's background, shifted by the tile's origin.

    For a worker that prepares the tiles' windows itself (`prepare_frame` with
    the whole frame's `fill_photons` and `median_photons`) and batches them.
    """
    locs, _, peak_index = localize_maps(card, maps, photons, tile.shape, camera, threshold=threshold, refine=refine,
                                        background_photons=stats.background_photons)
    rows, cols = np.divmod(peak_index, tile.shape[1])
    locs[:, 0] += tile.x0 * camera.pixel_size_nm
    locs[:, 1] += tile.y0 * camera.pixel_size_nm
    return TileResult(locs, (rows + tile.y0) * tile.frame_shape[1] + cols + tile.x0)


def merge(tiles: list[Tile], results: list[TileResult], pixel_size_nm: float) -> np.ndarray:
    """Each tile's result → one table, in the whole frame's order: a localization is kept by the tile whose core
    holds its position."""
    kept = [t.owns(r.locs[:, 0], r.locs[:, 1], pixel_size_nm) for t, r in zip(tiles, results, strict=True)]
    if not kept:
        return np.zeros((0, 7))
    locs = np.concatenate([r.locs[k] for r, k in zip(results, kept, strict=True)])
    peak_px = np.concatenate([r.peak_px[k] for r, k in zip(results, kept, strict=True)])
    return locs[np.argsort(peak_px, kind="stable")]


def localize_tiled(model: LoadedModel, photons: np.ndarray, camera: Any, *, threshold: float, core_px: int,
                   refine: bool = True, stats: list[FrameStatistics] | None = None,
                   margin_px: int | None = None) -> tuple[np.ndarray, float]:
    """`localization.localize_photons` over tiles, in this process: (H, W) photons or a (T, H, W) window ending at
    the frame to localize → (localizations, background photons/px), the whole frame's result."""
    window = np.asarray(photons)
    window = window[None] if window.ndim == 2 else window[-int(model.card.get("frames", 1)):]
    stats = stats or [frame_statistics(f, model.card) for f in window]
    tiles = plan_tiles(window.shape[-2:], core_px, tile_margin_px(model) if margin_px is None else margin_px,
                       int(model.card.get("input_multiple_px", 1)))
    results = [localize_tile(model, job, camera, threshold=threshold, refine=refine)
               for job in cut(window, stats, tiles)]
    return merge(tiles, results, camera.pixel_size_nm), stats[-1].background_photons


# -- live: tiles through the daemon's worker pool ------------------------------------------------------------------


class FrameTiler:
    """The daemon's frame sender cuts each frame larger than `core_px` on either side into tiles (one frame
    message each, inline: a crop, the whole frame's statistics in its header's TilePart). The model is loaded
    here only for its card and receptive field (the margin)."""

    def __init__(self, model: LoadedModel, core_px: int) -> None:
        self.card = model.card
        self.core_px = core_px
        self.margin_px = tile_margin_px(model)
        self._multiple_px = int(self.card.get("input_multiple_px", 1))
        self._plans: dict[tuple[int, int], list[Tile]] = {}

    def tiles_for(self, shape_px: tuple[int, int]) -> list[Tile]:
        """The tiles of a frame of this shape (one for a frame within `core_px`)."""
        shape_px = tuple(shape_px)
        if shape_px not in self._plans:
            self._plans.clear()  # one frame shape at a time
            self._plans[shape_px] = plan_tiles(shape_px, self.core_px, self.margin_px, self._multiple_px)
        return self._plans[shape_px]

    def cut(self, header: FrameHeader, frame: np.ndarray) -> list[tuple[FrameHeader, np.ndarray]] | None:
        """A raw frame (ADU) → its tiles' (header, crop) messages, row by row; None for a frame sent whole.
        Costs the whole frame's statistics once (about 10 ms per megapixel)."""
        tiles = self.tiles_for(frame.shape)
        if len(tiles) == 1:
            return None
        stats = frame_statistics(frame_to_photons(frame, header.camera), self.card)
        return [(dataclasses.replace(header, shape=t.shape, ring=None, tile=TilePart(
                    i, len(tiles), t.y0, t.x0, t.core_y0, t.core_y1, t.core_x0, t.core_x1, *t.frame_shape,
                    stats.fill_photons, stats.median_photons, stats.background_photons)),
                 np.ascontiguousarray(frame[t.slices])) for i, t in enumerate(tiles)]


def tile_of(part: TilePart, shape_px: tuple[int, int]) -> tuple[Tile, FrameStatistics]:
    """A tile message's header part and crop shape → the Tile and its frame's statistics."""
    h, w = shape_px
    return (Tile(part.y0, part.y0 + h, part.x0, part.x0 + w, part.core_y0, part.core_y1, part.core_x0,
                 part.core_x1, (part.frame_height, part.frame_width)),
            FrameStatistics(part.fill_photons, part.median_photons, part.background_photons))


class TileGather:
    """The daemon's results thread holds each tile's result until every tile of its frame has answered, then
    merges them into the frame's result (`merge`). Frames still incomplete beyond MAX_FRAMES (a tile lost
    with its worker) are forgotten, oldest first, and counted in `incomplete`."""

    MAX_FRAMES = 64

    def __init__(self) -> None:
        self._frames: OrderedDict[tuple[str, int], dict[int, Result]] = OrderedDict()
        self.incomplete = 0

    def add(self, r: Result) -> Result | None:
        """A tile's result → the merged frame result once its last tile is in, else None.
        MalformedMessage for a tile result that does not fit (peaks and localizations disagree)."""
        part = r.header.tile
        if len(r.peak_px) != len(r.localizations):
            raise MalformedMessage("result", f"tile {part.index}: {len(r.peak_px)} peaks for "
                                   f"{len(r.localizations)} localizations")
        key = (r.header.acquisition, r.seq)
        got = self._frames.setdefault(key, {})
        self._frames.move_to_end(key)
        got[part.index] = r
        while len(self._frames) > self.MAX_FRAMES:
            self._frames.popitem(last=False)
            self.incomplete += 1
        if len(got) < part.count or any(i not in got for i in range(part.count)):
            return None
        del self._frames[key]
        return _merged([got[i] for i in range(part.count)])

    def discard(self, acquisition: str, seq: int) -> None:
        """A frame a worker skipped a tile of will not complete."""
        self._frames.pop((acquisition, seq), None)


def _merged(parts: list[Result]) -> Result:
    """The tiles' results of one frame → one result for the whole frame, timed by its slowest tile."""
    placed = [tile_of(r.header.tile, r.header.shape) for r in parts]
    tiles = [tile for tile, _ in placed]
    locs = merge(tiles, [TileResult(np.asarray(r.localizations, dtype=float).reshape(-1, len(LOCALIZATION_COLUMNS)),
                                    np.asarray(r.peak_px, dtype=np.int64)) for r in parts],
                 parts[0].header.camera.pixel_size_nm)
    slowest = max(parts, key=lambda r: r.t_done_s)
    header = dataclasses.replace(slowest.header, shape=tiles[0].frame_shape, tile=None)
    return slowest.model_copy(update={"header": header, "localizations": [tuple(row) for row in locs.tolist()],
                                      "n_emitters": len(locs), "peak_px": [],
                                      "infer_ms": max(r.infer_ms for r in parts),
                                      "background_photons": placed[0][1].background_photons})


# -- tiles on worker processes -------------------------------------------------------------------------------------

_worker_model: LoadedModel | None = None


def _start_worker(model: str, provider: str, threads: int, psf_calibration: str | None) -> None:
    global _worker_model
    _worker_model = load_model(model, provider, threads=threads, psf_calibration=psf_calibration)


def _run_tile(job: TileJob, camera: Any, threshold: float, refine: bool) -> TileResult:
    assert _worker_model is not None, "TilePool worker without a model"
    return localize_tile(_worker_model, job, camera, threshold=threshold, refine=refine)


class TilePool:
    """The tiles of each frame localized on `workers` processes, each with its own ONNX Runtime session of
    `threads` intra-op threads (default: cores / workers, so the pool uses the machine once over).

    Processes are spawned (not forked: ONNX Runtime's thread pools do not
    survive a fork). Use as a context manager; `localize` takes whole frames.
    """

    def __init__(self, model: str = "localization.onnx", workers: int = 2, *, core_px: int = 512,
                 provider: str = "cpu", threads: int | None = None, psf_calibration: str | None = None) -> None:
        self.model = load_model(model, provider, threads=1, psf_calibration=psf_calibration)  # the card, the margin; tiles run in the workers
        self.core_px = core_px
        self.margin_px = tile_margin_px(self.model)
        self.threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.executor = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                                            initargs=(model, provider, self.threads, psf_calibration))
        started: set[int] = set()
        while len(started) < workers:  # start every worker and its session now, not on the first frame
            started |= set(self.executor.map(_worker_pid, range(workers)))

    def plan(self, shape_px: tuple[int, int]) -> list[Tile]:
        return plan_tiles(shape_px, self.core_px, self.margin_px, int(self.model.card.get("input_multiple_px", 1)))

    def localize(self, photons: np.ndarray, camera: Any, *, threshold: float, refine: bool = True,
                 stats: list[FrameStatistics] | None = None) -> tuple[np.ndarray, float]:
        """As `localize_tiled`, the tiles spread over the pool's processes."""
        window = np.asarray(photons)
        window = window[None] if window.ndim == 2 else window[-int(self.model.card.get("frames", 1)):]
        stats = stats or [frame_statistics(f, self.model.card) for f in window]
        tiles = self.plan(window.shape[-2:])
        futures = [self.executor.submit(_run_tile, job, camera, threshold, refine)
                   for job in cut(window, stats, tiles)]
        return merge(tiles, [f.result() for f in futures], camera.pixel_size_nm), stats[-1].background_photons

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)

    def __enter__(self) -> TilePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_pid(_: int) -> int:
    """A started worker's process id; it pauses so that the other start-up calls go to the other workers."""
    time.sleep(0.05)
    return os.getpid()
