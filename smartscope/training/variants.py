"""Cheaper variants of the localization models: int8 (static, QDQ) and fp16, by ONNX Runtime's own tools.

`smartscope train variants --seed 0` writes, beside each fp32 localization model
(`localization.onnx`, `localization-w8.onnx`), `<name>-int8.onnx` and
`<name>-fp16.onnx` with their cards, all but the measured and not shipped
(NOT_SHIPPED; `--out DIR` writes every one there). No retraining: the fp32
weights are converted.

- int8: `quant_pre_process` (shape inference, ORT's graph optimisation), then
  `quantize_static` in the QDQ format, int8 weights per output channel and
  uint8 activations, with the activation ranges calibrated (MinMax) on windows
  of our own simulator drawn from the training distribution and normalised
  exactly as the worker does (`prepare_input`). The calibration seed is apart
  from the training and test seeds. The first convolution and the head stay
  in float (`float_nodes`).
- fp16: `onnxruntime.transformers.float16.convert_float_to_float16` with
  float32 inputs and outputs kept (`keep_io_types`), so the worker feeds it as
  it feeds fp32. fp16 is for GPUs: ONNX Runtime's CPU provider runs few fp16
  kernels and casts around the rest.

`smartscope bench variants --world independent --json variants.json` measures
accuracy and speed against fp32; a variant is shipped in models/ only if its
accuracy loss is <= 1 % (NOT_SHIPPED lists the others).
`smartscope train variants --seed 0 --measured variants.json` writes the
figures into the cards (`record_measurement`), with the provider each was
measured faster on, which `inference.model: auto` reads. Rebuilding gives the
same bytes (same ONNX Runtime), and a card keeps its figures while they do.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from smartscope.inference.localization import prepare_input
from smartscope.simulation import CameraConfig, OpticsConfig, adu_to_photons
from smartscope.simulation.tiles import simulate_windows

#: the fp32 localization models that get variants
PARENTS = ("localization.onnx", "localization-w8.onnx")
PRECISIONS = ("int8", "fp16")
MAX_LOSS = 0.01  # the shipping rule: no accuracy figure more than 1 % worse than fp32's
#: measured by `smartscope bench variants --world independent` and not shipped (accuracy loss > 1 %)
NOT_SHIPPED: dict[str, str] = {}  # localization-w8-int8 was, until the refinement reached the bound (issue 28)
CALIBRATION_SEED_OFFSET = 20_000  # apart from training (seed) and test (seed + 10 000) draws
CALIBRATION = {"windows": 64, "tile_px": 64, "method": "MinMax",
               "data": "windows of the training distribution (simulation.tiles.TILE_DISTRIBUTION), half with "
                       "an out-of-focus glow, ADU -> photons -> prepare_input as the worker does"}


def variant_name(parent: str, precision: str) -> str:
    """localization.onnx, int8 → localization-int8.onnx."""
    return f"{Path(parent).stem}-{precision}.onnx"


def calibration_batches(card: dict[str, Any], seed: int, n: int = CALIBRATION["windows"],
                        tile_px: int = CALIBRATION["tile_px"]) -> list[np.ndarray]:
    """n network inputs (1, frames, H, W) float32 from simulated windows, prepared as the worker prepares frames."""
    optics, camera = OpticsConfig(), CameraConfig()
    rng = np.random.default_rng(seed + CALIBRATION_SEED_OFFSET)
    windows, _, _ = simulate_windows(rng, n, int(card.get("frames", 1)), tile_px, optics, camera,
                                     structured_background=True, as_adu=True)
    return [prepare_input(adu_to_photons(w, camera), card)[0] for w in windows]


class SimulatedFrames(CalibrationDataReader):
    """ONNX Runtime's calibration reader over `calibration_batches`."""

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name, self._batches = input_name, batches
        self._iter: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes int8 leaves in float: the first convolution and the head (the last one and all after it).

    The first reads photons, whose calibrated range the brightest emitters set, so that a dim
    emitter would get a few levels; the head's maps are thresholded and give sub-pixel offsets.
    Quantized, the head cost 4 % of Jaccard at 2 /µm² (false detections: precision 0.99 → 0.90);
    kept in float, int8 stays within 0.3 % (30 dense tiles, both worlds), at the same speed.
    """
    names = [n.name for n in model.graph.node]
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return [convs[0], *names[names.index(convs[-1]):]]


def quantize_int8(src: Path, dst: Path, card: dict[str, Any], seed: int) -> dict[str, Any]:
    """Static QDQ int8 of `src`, calibrated on simulated frames; returns the settings for the card."""
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        # symbolic shape inference cannot follow Resize on free H, W; ONNX shape inference can
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        keep_float = float_nodes(onnx.load(str(pre)))
        reader = SimulatedFrames(card["inputs"][0]["name"], calibration_batches(card, seed))
        quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float)
    return {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8",
            "float_nodes": keep_float, "calibration": {**CALIBRATION, "seed": seed + CALIBRATION_SEED_OFFSET}}


def convert_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """fp16 weights and arithmetic, float32 inputs and outputs; returns the settings for the card."""
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return {"converter": "onnxruntime.transformers.float16.convert_float_to_float16", "keep_io_types": True}


def build_variant(parent_path: Path, precision: str, out_dir: Path, seed: int = 0) -> Path:
    """Write `<parent>-<precision>.onnx` and its card (the parent's card, renamed, with a `variant` section)."""
    card = json.loads(parent_path.with_suffix(".json").read_text())
    dst = Path(out_dir) / variant_name(parent_path.name, precision)
    before = json.loads(dst.with_suffix(".json").read_text()) if dst.with_suffix(".json").is_file() else {}
    if precision == "int8":
        settings = quantize_int8(parent_path, dst, card, seed)
    elif precision == "fp16":
        settings = convert_fp16(parent_path, dst)
    else:
        raise ValueError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    card.update(name=dst.stem, file=dst.name)
    card.pop("metrics", None)  # the parent's; the variant's own come from `smartscope bench variants`
    card["variant"] = {"of": parent_path.name, "precision": precision, **settings,
                       "onnxruntime": ort.__version__,
                       "build_command": f"smartscope train variants --seed {seed}",
                       "faster_on": []}  # providers where `bench variants` measured it faster than its parent
    if before.get("metrics", {}).get("sha256") == _sha256(dst):  # the same bytes: the measurement still holds
        card["metrics"], card["variant"]["faster_on"] = before["metrics"], before["variant"]["faster_on"]
    dst.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return dst


def build_variants(models_dir: Path, out_dir: Path | None = None, seed: int = 0,
                   parents: tuple[str, ...] = PARENTS, precisions: tuple[str, ...] = PRECISIONS) -> list[Path]:
    """The variants of every parent found in `models_dir`, written to `out_dir`; without `out_dir`, the
    shipped ones (all but NOT_SHIPPED) beside their parents."""
    skip = NOT_SHIPPED if out_dir is None else {}
    out_dir = Path(out_dir or models_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [build_variant(Path(models_dir) / parent, precision, out_dir, seed)
            for parent in parents if (Path(models_dir) / parent).is_file() for precision in precisions
            if variant_name(parent, precision) not in skip]


def accuracy_losses(world: dict, parent: str, name: str) -> dict[str, float]:
    """Relative accuracy loss of `name` against `parent` (positive: worse): Jaccard and each RMSE / √CRLB
    (the same bound for both, so the RMSE's ratio, taken from the RMSE in nm, not the rounded ratio)."""
    dense = world["dense"] if "dense" in world else world["dense_2_per_um2"]
    j0, j1 = dense[parent]["jaccard"], dense[name]["jaccard"]
    losses = {"jaccard_2_per_um2": round((j0 - j1) / j0, 4)}
    for photons, level in world["isolated"].items():
        r0, r1 = level[parent]["rmse_x_nm"], level[name]["rmse_x_nm"]
        losses[f"rmse_over_crlb_{photons}"] = round((r1 - r0) / r0, 4)
    return losses


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record_measurement(bench: dict[str, Any], models_dir: Path) -> dict[str, dict[str, Any]]:
    """Write the figures of a `smartscope bench variants --world independent` JSON into the cards:
    each shipped variant's card gets its `metrics` and `variant.faster_on` (the provider the speed was
    measured on, where it was faster at every size and thread count; other providers kept); each fp32
    card a `variants` summary of every variant measured, shipped or not. Returns that summary."""
    res, models_dir = bench["results"], Path(models_dir)
    provider = res.get("speed_provider", "CPUExecutionProvider")
    speed = {tuple(k.split("|")): ms for k, ms in res["speed_ms"].items()}  # (name, "256px", "1thr", level)
    command = f"smartscope bench variants --world {bench.get('world', 'simulator')}"
    summaries = {}
    for parent, entry in res["parents"].items():
        worlds = [w for w in ("simulator", "independent") if w in entry]
        cpu_ms = {n: {f"{s}_{t}": ms for (name, s, t, level), ms in speed.items() if name == n and level == "all"}
                  for n in entry["sizes_bytes"]}
        summary = {}
        for name in list(entry["sizes_bytes"])[1:]:
            losses = {w: accuracy_losses(entry[w], parent, name) for w in worlds}
            worst_at, worst = max(((f"{w}.{k}", x) for w, ls in losses.items() for k, x in ls.items()),
                                  key=lambda kv: kv[1])
            ratios = {k: round(ms / cpu_ms[parent][k], 3) for k, ms in cpu_ms[name].items()}
            card_path = models_dir / f"{name}.json"
            shipped = card_path.with_suffix(".onnx").is_file()
            summary[name] = {"shipped": shipped, "worst_loss": worst, "worst_at": worst_at,
                             "cpu_time_ratio_to_fp32": ratios, "bytes": entry["sizes_bytes"][name]}
            if not shipped:
                continue
            card = json.loads(card_path.read_text())
            faster = worst <= MAX_LOSS and max(ratios.values()) < 1
            others = [p for p in card["variant"].get("faster_on", []) if p != provider]
            card["variant"]["faster_on"] = sorted({*others, *([provider] if faster else [])})
            card["metrics"] = {
                "measured_with": f"{command} --json variants.json ({bench['seconds']:.0f} s on the shared "
                                 "2-core CPU machine)",
                "recorded_with": "smartscope train variants --seed 0 --measured variants.json",
                "protocol": f"as bench localization: threshold {entry['threshold']} tuned on the fp32 parent and "
                            "used unchanged; the same frames for parent and variant; Jaccard at 2 /um2 (60 tiles "
                            "of 64x64), RMSE x / sqrt(CRLB) of 1000 isolated emitters per photon level; "
                            "independent: the held-out pupil-function PSF; CPU: median ms of one network call, "
                            "optimisation all (as the service), interleaved with the parent's",
                "accuracy": {w: {"jaccard_2_per_um2": {n: (entry[w].get("dense") or entry[w]["dense_2_per_um2"])[n]
                                                       ["jaccard"] for n in (parent, name)},
                                 "rmse_over_crlb": {p: {n: level[n]["rmse_over_crlb"] for n in (parent, name)}
                                                    for p, level in entry[w]["isolated"].items()}}
                             for w in worlds},
                "loss_vs_fp32": losses,
                "cpu_ms_per_call": {n: cpu_ms[n] for n in (parent, name)},
                "verdict": {"worst_loss": worst, "worst_at": worst_at, "max_loss": MAX_LOSS,
                            "qualifies": worst <= MAX_LOSS, "cpu_time_ratio_to_fp32": ratios},
                "sha256": _sha256(card_path.with_suffix(".onnx")),
            }
            card_path.write_text(json.dumps(card, indent=2))
        parent_card = models_dir / f"{parent}.json"
        card = json.loads(parent_card.read_text())
        card["variants"] = {"rule": f"shipped only if no accuracy figure is more than {MAX_LOSS:.0%} worse "
                                    "than this model's", "measured_with": command,
                            "build_command": "smartscope train variants --seed 0", **summary}
        parent_card.write_text(json.dumps(card, indent=2))
        summaries[parent] = summary
    return summaries
