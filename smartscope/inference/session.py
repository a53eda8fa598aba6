"""ONNX Runtime sessions for the shipped models, checked against their model cards.

The model card (JSON beside the .onnx file) is the one source of truth for a
model's input layout, normalisation and the physical scale it was trained at;
`load_model` refuses a model whose card and graph disagree, or that does not
fit the frames it will see, with a message that says what to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from smartscope.resources import bundled_path, resolve_model_path


class ModelError(ValueError):
    """A model that cannot serve this run (missing, inconsistent, wrong scale)."""


GPU_PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}


def choose_providers(preference: str = "auto") -> list[str]:
    """The wanted GPU provider (auto: CUDA when present), CPU always as the fallback.

    TensorRT is used only when asked for: it builds an engine per input shape
    at start, which takes minutes; CUDA starts in seconds.
    """
    available = ort.get_available_providers()
    wanted = GPU_PROVIDERS.get("cuda" if preference == "auto" else preference)
    if wanted and wanted not in available:
        if preference == "auto":
            return ["CPUExecutionProvider"]
        raise ModelError(f"inference.provider: {preference} requested but onnxruntime has no "
                         f"{wanted} (available: {available}); install smartscope[gpu]")
    chain = [wanted] if wanted else []
    if wanted == GPU_PROVIDERS["tensorrt"] and GPU_PROVIDERS["cuda"] in available:
        chain.append(GPU_PROVIDERS["cuda"])
    return [*chain, "CPUExecutionProvider"]


@dataclass
class LoadedModel:
    session: ort.InferenceSession
    card: dict[str, Any]
    path: Path

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def input_name(self) -> str:
        return self.session.get_inputs()[0].name

    @property
    def batches(self) -> bool:
        """True when the graph takes several frames per call (a dynamic first axis)."""
        return not isinstance(self.session.get_inputs()[0].shape[0], int)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def warm_up(self, frame_shape_px: tuple[int, int]) -> None:
        """One call on zeros of the input shape frames of this size give (padded to the stride)."""
        m = int(self.card.get("input_multiple_px", 1))
        size = {"H": -(-frame_shape_px[0] // m) * m, "W": -(-frame_shape_px[1] // m) * m}
        shape = [d if isinstance(d, int) else size.get(d, 1) for d in self.card["inputs"][0]["shape"]]
        self.run(np.zeros(shape, np.float32))


AUTO = "auto"
DEFAULT_MODEL = "localization.onnx"


def auto_model(provider: str, models_dir: Path | None = None) -> str:
    """`inference.model: auto`: the shipped variant of localization.onnx whose card says it was measured
    faster on this execution provider at an accuracy loss <= 1 % (`variant.faster_on`, written from
    `smartscope bench variants`), else localization.onnx itself. Variants are shipped only when
    their accuracy qualifies; fp16 is never chosen on CPU, where ONNX Runtime has few fp16 kernels."""
    folder = models_dir or bundled_path("models")
    for card_path in sorted(folder.glob(f"{Path(DEFAULT_MODEL).stem}-*.json")):
        variant = json.loads(card_path.read_text()).get("variant", {})
        if (variant.get("of") == DEFAULT_MODEL and provider in variant.get("faster_on", [])
                and card_path.with_suffix(".onnx").is_file()):
            return card_path.with_suffix(".onnx").name
    return DEFAULT_MODEL


def read_card(model: str, preference: str = "auto") -> tuple[Path, dict[str, Any]]:
    """The model file and its card; ModelError if either is missing.

    `auto` resolves for the first provider `choose_providers(preference)` gives (inference.provider).
    """
    if model == AUTO:
        model = auto_model(choose_providers(preference)[0])
    path = resolve_model_path(model)
    if not path.is_file():
        raise ModelError(f"inference.model: model file not found: {path}")
    card_path = path.with_suffix(".json")
    if not card_path.is_file():
        raise ModelError(f"inference.model: model card not found: {card_path}")
    return path, json.loads(card_path.read_text())


#: ONNX Runtime's graph optimisation levels by name; `smartscope bench variants` measures each
GRAPH_OPTIMIZATION = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                      "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                      "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                      "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def load_model(model: str, preference: str = "auto", *, threads: int | None = None,
               optimization: str = "all", psf_calibration: str | Path | None = None) -> LoadedModel:
    """An ONNX Runtime session set up for latency: one frame at a time, operators in sequence.

    `model`: a path, a name in models/, or `auto` (`auto_model`: the cheaper
    variant the cards qualify for this provider, else localization.onnx).
    `threads`: intra-op threads (None: ONNX Runtime's default, one per core).
    Threads do not spin-wait between calls: on a small machine the cores are
    shared with the camera, storage and the other workers.
    `optimization`: a GRAPH_OPTIMIZATION level; `all` was the fastest for the
    fp32, int8 and fp16 localization models on CPU (`smartscope bench variants`;
    int8 needs at least `extended` to run integer kernels).
    `psf_calibration`: a bead calibration (`smartscope calibrate psf`, a .npz)
    that the maximum-likelihood refinement fits instead of the card's
    astigmatic Gaussian; carried in this session's copy of the card.
    """
    providers = choose_providers(preference)
    path, card = read_card(model, preference)
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types
        raise ModelError(f"inference.model: cannot load {path}: {e}") from e
    spec = card["inputs"][0]
    graph_input = session.get_inputs()[0]
    if graph_input.name != spec["name"] or len(graph_input.shape) != len(spec["shape"]):
        raise ModelError(f"model {path.name}: graph input {graph_input.name}{graph_input.shape} "
                         f"does not match its card {spec['name']}{spec['shape']}")
    if psf_calibration is not None:
        card = with_psf_calibration(card, psf_calibration)
    return LoadedModel(session, card, path)


def with_psf_calibration(card: dict[str, Any], psf_calibration: str | Path) -> dict[str, Any]:
    """A copy of the card whose refinement fits this bead calibration; ModelError if it cannot be read."""
    from smartscope.inference.psf import load_psf

    calibration = Path(psf_calibration).resolve()
    try:
        load_psf(calibration)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"PSF calibration {psf_calibration}: cannot read it ({e}); make one with "
                         "`smartscope calibrate psf BEADS.tif`") from e
    return {**card, "psf_calibration": str(calibration)}


def fill_non_finite(pixels: np.ndarray) -> np.ndarray:
    """A float32 copy with NaN / inf pixels (saturated, or masked in float stacks) set to the median
    of the finite ones, or 0 where there are none: a filled pixel looks like background to every
    model, so it can create no detection, and an all-NaN window makes numpy warn nowhere."""
    out = np.array(pixels, dtype=np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        out[~finite] = np.median(out[finite]) if finite.any() else 0.0
    return out


def check_fits_frames(card: dict[str, Any], shape_px: tuple[int, int], pixel_size_nm: float) -> None:
    """The frames must be at least the model's minimum size and at its pixel scale."""
    min_px = card.get("min_input_px", 1)
    if min(shape_px) < min_px:
        raise ModelError(f"frames of {shape_px[0]}x{shape_px[1]} px are smaller than the model's "
                         f"minimum input of {min_px} px ({card['name']})")
    trained_nm = card.get("pixel_size_nm")
    if trained_nm and abs(pixel_size_nm / trained_nm - 1) > 0.1:
        raise ModelError(f"camera pixel size {pixel_size_nm} nm is more than 10% off the "
                         f"{trained_nm} nm the model {card['name']} was trained at")
    if card.get("psf_calibration"):  # a PSF sampled by other pixels is another model
        from smartscope.inference.psf import load_psf

        calibrated_nm = load_psf(card["psf_calibration"]).pixel_size_nm
        if not np.isclose(calibrated_nm, pixel_size_nm, rtol=1e-3):
            raise ModelError(f"the PSF calibration {card['psf_calibration']} was made with {calibrated_nm:g} nm "
                             f"pixels, the frames have {pixel_size_nm:g} nm: calibrate with beads on this camera")
