"""Train the localization network on our own simulation and export it to ONNX.

DeepTrack's lesson: simulate the optics and the camera exactly and the ground
truth is free. Each training tile (`simulation.tiles`) is rendered with the project's optics
and camera model (astigmatic integrated-Gaussian PSF, Poisson + read noise, ADU),
converted back to photons the way the worker does, and paired with per-pixel
targets: p = 1 in the pixel holding an emitter's centre, with its sub-pixel
offset, z and photon count there (Deep-STORM/DECODE-style, one frame in).

`smartscope train localization --seed 0` reproduces models/localization.onnx
and its card (metrics measured on held-out simulated frames).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from smartscope.evaluation import score
from smartscope.inference.localization import localize_photons, normalise
from smartscope.simulation import CameraConfig, OpticsConfig, astigmatic_sigmas_nm, integrated_gaussian_crlb_nm
from smartscope.simulation.tiles import TILE_DISTRIBUTION, simulate_tiles
from smartscope.training.common import UNet2d, export_onnx, fit, seed_everything
from smartscope.transport.protocol import CameraParams

CHANNELS = ("p", "dx", "dy", "z", "photons")
NORMALISATION = {"subtract_median": True, "input_scale_photons": 50.0, "z_scale_nm": 500.0,
                 "photon_scale": 1000.0}
INPUT_MULTIPLE_PX = 4
TRAIN = {"tile_px": 40, "pixel_size_nm": 100.0, **TILE_DISTRIBUTION}  # recorded in the model card


class LocalizationNet(nn.Module):
    """A small U-Net (16-32-64 channels): ~0.3 GMAC for a 96x96 frame."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = UNet2d(1, width)
        self.head = nn.Conv2d(width, len(CHANNELS), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.backbone(x))
        p = torch.sigmoid(h[:, :1])
        dxy = 0.6 * torch.tanh(h[:, 1:3])
        z = 1.5 * torch.tanh(h[:, 3:4])
        photons = nn.functional.softplus(h[:, 4:5])
        return torch.cat([p, dxy, z, photons], 1)


def targets(truth: list[np.ndarray], tile_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel targets (n, 5, H, W) and the mask of pixels that hold an emitter."""
    px = TRAIN["pixel_size_nm"]
    t = np.zeros((len(truth), len(CHANNELS), tile_px, tile_px), np.float32)
    for i, em in enumerate(truth):
        for x, y, z, ph in em[np.argsort(em[:, 3])]:  # brightest written last wins a shared pixel
            ix, iy = int(x // px), int(y // px)
            t[i, :, iy, ix] = (1.0, x / px - ix - 0.5, y / px - iy - 0.5, z / NORMALISATION["z_scale_nm"],
                               ph / NORMALISATION["photon_scale"])
    return t, t[:, 0] > 0


def loss_fn(out: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bce = nn.functional.binary_cross_entropy(out[:, 0], tgt[:, 0], weight=1 + 9 * tgt[:, 0])
    if not mask.any():
        return bce
    o, t = out.permute(0, 2, 3, 1)[mask], tgt.permute(0, 2, 3, 1)[mask]
    xy = nn.functional.smooth_l1_loss(o[:, 1:3], t[:, 1:3], beta=0.05) * 10
    z = nn.functional.smooth_l1_loss(o[:, 3], t[:, 3], beta=0.05) * 2
    ph = (torch.abs(o[:, 4] - t[:, 4]) / t[:, 4].clamp(min=0.1)).mean()
    return bce + xy + z + ph


def _predict(model: Any, frames: np.ndarray, camera: CameraConfig, threshold: float = 0.5) -> list[np.ndarray]:
    """Localize tiles (photons) exactly as the worker does: network, decoding, ML refinement.

    `model` is anything with `.card` and `.run(batch) -> maps`: the torch net in
    training (`_TorchModel`), or the exported ONNX session (`load_model`).
    """
    params = CameraParams(pixel_size_nm=TRAIN["pixel_size_nm"], offset_adu=camera.offset_adu,
                          e_per_adu=camera.e_per_adu, qe=camera.qe, em_gain=camera.em_gain)
    return [localize_photons(model, f, params, threshold=threshold)[0] for f in frames]


class _TorchModel:
    """The training net behind the same interface as an ONNX LoadedModel."""

    def __init__(self, net: nn.Module) -> None:
        self.net, self.card = net, _card_core()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.from_numpy(batch)).numpy()


def evaluate(model: Any, seed: int, optics: OpticsConfig, camera: CameraConfig) -> dict[str, Any]:
    """Held-out metrics: dense frames (Jaccard etc.) and isolated emitters vs the CRLB.

    `smartscope.training.localization.evaluate(load_model("localization.onnx"), 0, ...)`
    re-measures a shipped model without retraining it.
    """
    rng = np.random.default_rng(seed + 10_000)
    metrics: dict[str, Any] = {}
    for name, density in (("density_0.5_per_um2", 0.5), ("density_2_per_um2", 2.0)):
        tile = 64
        area = (tile * TRAIN["pixel_size_nm"] / 1000) ** 2
        em = []
        for _ in range(60):
            k = rng.poisson(density * area)
            em.append(np.column_stack([rng.uniform(0, tile * 100, (k, 2)), rng.uniform(-500, 500, k),
                                       np.exp(rng.uniform(np.log(500), np.log(5000), k))]))
        frames, truth = simulate_tiles(rng, 60, tile, optics, camera, emitters=em, background=np.full(60, 20.0))
        metrics[name] = score([t[:, :3] for t in truth], [p[:, :3] for p in _predict(model, frames, camera)])
    isolated = {}
    for photons in (500, 1000, 2000, 5000):
        n = 200
        em = [np.array([[rng.uniform(1500, 1700), rng.uniform(1500, 1700), 0.0, photons]]) for _ in range(n)]
        frames, truth = simulate_tiles(rng, n, 32, optics, camera, emitters=em, background=np.full(n, 10.0))
        s = score([t[:, :3] for t in truth], [p[:, :3] for p in _predict(model, frames, camera)])
        sx, _ = astigmatic_sigmas_nm(np.zeros(1), optics)
        crlb = integrated_gaussian_crlb_nm(photons * camera.qe, 10.0 * camera.qe, float(sx[0]), 100.0)
        # shot noise is on detected photoelectrons: the bound uses N·QE and b·QE
        isolated[str(photons)] = {"rmse_x_nm": s["rmse_x_nm"], "crlb_x_nm": round(crlb, 2),
                                  "rmse_over_crlb": round(s["rmse_x_nm"] / crlb, 3), "recall": s["recall"],
                                  "rmse_axial_nm": s["rmse_axial_nm"]}
    metrics["isolated_background_10"] = isolated
    return metrics


def _card_core() -> dict[str, Any]:
    optics = OpticsConfig()
    sx, _ = astigmatic_sigmas_nm(np.zeros(1), optics)
    return {
        "name": "localization",
        "task": "single-molecule localization (x, y, z from the astigmatic PSF, photons)",
        "inputs": [{"name": "frames", "shape": ["N", 1, "H", "W"], "dtype": "float32",
                    "description": "one frame in photons (ADU → photons by the camera model), minus its "
                                   "median if subtract_median, / input_scale_photons"}],
        "outputs": [{"name": "maps", "shape": ["N", len(CHANNELS), "H", "W"], "channels": list(CHANNELS),
                     "description": "p: detection probability; dx, dy: emitter offset from the pixel centre "
                                    "(px); z: z / z_scale_nm; photons: photons / photon_scale"}],
        "normalisation": NORMALISATION,
        "input_multiple_px": INPUT_MULTIPLE_PX,
        "min_input_px": 8,
        "pixel_size_nm": TRAIN["pixel_size_nm"],
        "psf_sigma_nm": round(float(sx[0]), 1),
        "astigmatism": {"sigma0_nm": optics.sigma0_nm(), "focal_offset_nm": optics.astig_focal_offset_nm,
                        "depth_nm": optics.astig_depth_nm},
    }


DEFAULT_WIDTH = 16


def model_name(width: int) -> str:
    """localization (the default width) or localization-w8 etc.: narrower is faster on large frames."""
    return "localization" if width == DEFAULT_WIDTH else f"localization-w{width}"


def train_and_export(seed: int = 0, out_dir: Path = Path("models"), steps: int | None = None,
                     batch: int = 24, log_every: int = 100, width: int = DEFAULT_WIDTH) -> dict[str, Any]:
    steps = steps or 4000
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    optics, camera = OpticsConfig(), CameraConfig()
    net = LocalizationNet(width)
    tile = TRAIN["tile_px"]

    def next_batch() -> tuple[torch.Tensor, ...]:
        frames, truth = simulate_tiles(rng, batch, tile, optics, camera)
        tgt, mask = targets(truth, tile)
        x = torch.from_numpy(normalise(frames, NORMALISATION)[:, None])
        return x, torch.from_numpy(tgt), torch.from_numpy(mask)

    seconds = fit(net, next_batch, loss_fn, steps, log_every=log_every)
    metrics = evaluate(_TorchModel(net), seed, optics, camera)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{model_name(width)}.onnx"
    export_onnx(net, torch.zeros(1, 1, 64, 64), onnx_path, "frames", "maps")
    card = {
        **_card_core(),
        "name": model_name(width),
        "version": 1,
        "file": onnx_path.name,
        "architecture": f"U-Net {width}-{2 * width}-{4 * width}, 1 frame in, 5 maps out",
        "parameters": sum(p.numel() for p in net.parameters()),
        "training": {"seed": seed, "steps": steps, "batch": batch, "optimizer": "AdamW + OneCycle, max lr 2e-3",
                     "data": {**TRAIN, "camera": camera.model_dump(), "optics": optics.model_dump()},
                     "seconds": round(seconds, 1), "torch": torch.__version__},
        "metrics": {"protocol": "the full pipeline (network, decoding, ML refinement of isolated detections); "
                                "greedy nearest-first matching per frame within 250 nm lateral; "
                                "isolated: one emitter per 32x32 tile at z = 0, RMSE in x vs sqrt(CRLB_x) "
                                "of an integrated Gaussian with Poisson noise on N·QE photoelectrons",
                    **metrics},
        "retrain_command": f"smartscope train localization --seed {seed}" + (f" --steps {steps}" if steps != 4000 else "")
        + (f" --width {width}" if width != DEFAULT_WIDTH else ""),
    }
    onnx_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return card
