"""Train the localization network on our own simulation and export it to ONNX.

DeepTrack's lesson: simulate the optics and the camera exactly and the ground
truth is free. Each training tile (`simulation.tiles`) is rendered with the project's optics
and camera model (astigmatic integrated-Gaussian PSF, Poisson + read noise, ADU),
converted back to photons the way the worker does, and paired with per-pixel
targets: p = 1 in the pixel holding an emitter's centre, with its sub-pixel
offset, z and photon count there, and the background everywhere
(Deep-STORM/DECODE-style). The input is a causal window of 3 frames: a
molecule blinks over several frames, so the frames before say where a dim one
is. The network also predicts the uncertainty of each estimate (a Gaussian
negative log-likelihood on its own errors, as DECODE does), which the worker
reports for the detections the ML refinement does not reach. Half the tiles
draw their emitters through pupil-function PSFs that follow the card's widths
(`simulation.pupil`): a real PSF's rings and side lobes are not emitters.

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

from smartscope.evaluation import match_frame, score
from smartscope.inference.localization import localize_photons, normalise
from smartscope.simulation import CameraConfig, OpticsConfig, astigmatic_sigmas_nm, integrated_gaussian_crlb_nm
from smartscope.simulation.pupil import (
    ANCHOR,
    ANCHOR_SPREAD,
    RESIDUAL_RAD,
    RESIDUAL_TERMS,
    WAVELENGTH_NM,
    PupilFamily,
)
from smartscope.simulation.tiles import P_STAY_ON, TILE_DISTRIBUTION, dense_emitters, simulate_windows
from smartscope.training import TEST_SEED_OFFSET
from smartscope.training.common import UNet2d, export_onnx, fit, seed_everything
from smartscope.transport.protocol import CameraParams

CHANNELS = ("p", "dx", "dy", "z", "photons", "bg", "sigma_x", "sigma_y", "sigma_z", "sigma_photons")
FRAMES = 3  # t-2, t-1, t
#: training windows whose earlier frames are replaced by copies (all, or the oldest), as the worker
#: fills a window whose frames another worker took, so one frame alone still localizes well
CONTEXT_DROPOUT = {"all": 0.15, "oldest": 0.1}
NORMALISATION = {"subtract_median": True, "input_scale_photons": 50.0, "z_scale_nm": 500.0,
                 "photon_scale": 1000.0}
INPUT_MULTIPLE_PX = 4
# share of training tiles drawn through pupil-function PSFs anchored to the card (rings, side lobes), and
# how many members the bank holds (simulation/pupil.py)
PUPIL_SHARE = 0.5
PUPIL_MEMBERS = 32
TRAIN = {"tile_px": 40, "pixel_size_nm": 100.0, **TILE_DISTRIBUTION, "p_stay_on": P_STAY_ON,
         "structured_background": "half the tiles: a Gaussian glow, 4-16 px wide, up to 3x the flat level",
         "context_dropout": CONTEXT_DROPOUT,
         "pupil_family": {"share": PUPIL_SHARE, "members": PUPIL_MEMBERS, "anchor": ANCHOR,
                          "anchor_spread": ANCHOR_SPREAD, "wavelength_nm": WAVELENGTH_NM,
                          "residual_aberrations_rad": RESIDUAL_RAD,
                          "residual_terms": [f"Z({n},{m})" for n, m in RESIDUAL_TERMS]}}  # recorded in the model card


class LocalizationNet(nn.Module):
    """A small U-Net (16-32-64 channels): ~0.3 GMAC for a 96x96 frame; the frames are its input channels."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.backbone = UNet2d(FRAMES, width)
        self.head = nn.Conv2d(width, len(CHANNELS), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.backbone(x))
        p = torch.sigmoid(h[:, :1])
        dxy = 0.6 * torch.tanh(h[:, 1:3])
        z = 1.5 * torch.tanh(h[:, 3:4])
        photons = nn.functional.softplus(h[:, 4:5])
        sigmas = nn.functional.softplus(h[:, 6:10]) + 1e-3
        return torch.cat([p, dxy, z, photons, h[:, 5:6], sigmas], 1)


def targets(truth: list[np.ndarray], background_residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel targets (n, 6, H, W: p, dx, dy, z, photons, bg) and the mask of pixels that hold
    an emitter; `background_residual` (n, H, W) is the background minus the frame median, in input units."""
    px = TRAIN["pixel_size_nm"]
    tile_px = background_residual.shape[-1]
    t = np.zeros((len(truth), 6, tile_px, tile_px), np.float32)
    t[:, 5] = background_residual
    for i, em in enumerate(truth):
        for x, y, z, ph in em[np.argsort(em[:, 3])]:  # brightest written last wins a shared pixel
            ix, iy = int(x // px), int(y // px)
            t[i, :5, iy, ix] = (1.0, x / px - ix - 0.5, y / px - iy - 0.5, z / NORMALISATION["z_scale_nm"],
                               ph / NORMALISATION["photon_scale"])
    return t, t[:, 0] > 0


def loss_fn(out: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bce = nn.functional.binary_cross_entropy(out[:, 0], tgt[:, 0], weight=1 + 9 * tgt[:, 0])
    bg = nn.functional.smooth_l1_loss(out[:, 5], tgt[:, 5], beta=0.1) * 0.5
    if not mask.any():
        return bce + bg
    o, t = out.permute(0, 2, 3, 1)[mask], tgt.permute(0, 2, 3, 1)[mask]
    xy = nn.functional.smooth_l1_loss(o[:, 1:3], t[:, 1:3], beta=0.05) * 10
    z = nn.functional.smooth_l1_loss(o[:, 3], t[:, 3], beta=0.05) * 2
    ph = (torch.abs(o[:, 4] - t[:, 4]) / t[:, 4].clamp(min=0.1)).mean()
    # the uncertainties learn the size of the network's own errors (the estimates are detached)
    err = (o[:, 1:5] - t[:, 1:5]).detach()
    sigma = o[:, 6:10]
    nll = (torch.log(sigma) + 0.5 * (err / sigma) ** 2).mean()
    return bce + xy + z + ph + bg + 0.2 * nll


def _predict(model: Any, windows: np.ndarray, camera: CameraConfig, threshold: float = 0.5) -> list[np.ndarray]:
    """Localize the last frame of each window (photons) exactly as the worker does: network,
    decoding, ML refinement. Rows: LOCALIZATION_COLUMNS.

    `model` is anything with `.card` and `.run(batch) -> maps`: the torch net in
    training (`_TorchModel`), or the exported ONNX session (`load_model`).
    """
    params = CameraParams(pixel_size_nm=TRAIN["pixel_size_nm"], offset_adu=camera.offset_adu,
                          e_per_adu=camera.e_per_adu, qe=camera.qe, em_gain=camera.em_gain)
    return [localize_photons(model, w, params, threshold=threshold)[0] for w in windows]


class _TorchModel:
    """The training net behind the same interface as an ONNX LoadedModel."""

    def __init__(self, net: nn.Module) -> None:
        self.net, self.card = net, _card_core()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.from_numpy(batch)).numpy()


def uncertainty_calibration(truth: list[np.ndarray], pred: list[np.ndarray]) -> dict[str, float]:
    """How well the reported uncertainty (per axis, nm) matches the real error of matched
    localizations: RMS of error / uncertainty (1 is right) and the share within one sigma (0.683)."""
    ratios = []
    for t, p in zip(truth, pred, strict=True):
        ti, pi = match_frame(t[:, :2], p[:, :2])
        if len(ti):
            ratios.append(((p[pi, :2] - t[ti, :2]) / p[pi, 4:5]).ravel())
    r = np.concatenate(ratios) if ratios else np.zeros(0)
    return {"rms_error_over_uncertainty": round(float(np.sqrt(np.mean(r**2))), 3) if r.size else float("nan"),
            "within_1_sigma": round(float(np.mean(np.abs(r) < 1)), 3) if r.size else float("nan")}


def evaluate(model: Any, seed: int, optics: OpticsConfig, camera: CameraConfig) -> dict[str, Any]:
    """Held-out metrics: dense windows (Jaccard etc.), the same windows with one frame alone
    (the worker's fallback), a structured background, and isolated emitters vs the CRLB.

    `smartscope.training.localization.evaluate(load_model("localization.onnx"), 0, ...)`
    re-measures a shipped model without retraining it (a one-frame model sees the last frame).
    """
    rng = np.random.default_rng(seed + TEST_SEED_OFFSET)
    metrics: dict[str, Any] = {}
    tile, n = 64, 60
    for name, density in (("density_0.5_per_um2", 0.5), ("density_2_per_um2", 2.0)):
        em = dense_emitters(rng, n, tile, TRAIN["pixel_size_nm"], density, z_half_range_nm=500.0)
        windows, truth, _ = simulate_windows(rng, n, FRAMES, tile, optics, camera, emitters=em,
                                             background=np.full(n, 20.0))
        pred = _predict(model, windows, camera)
        metrics[name] = {**score([t[:, :3] for t in truth], [p[:, :3] for p in pred]),
                         "uncertainty": uncertainty_calibration(truth, pred)}
        if density == 2.0:
            alone = _predict(model, windows[:, -1:], camera)
            metrics[name + "_one_frame"] = score([t[:, :3] for t in truth], [p[:, :3] for p in alone])
    em = dense_emitters(rng, n, tile, TRAIN["pixel_size_nm"], 0.5, z_half_range_nm=500.0)
    windows, truth, bg_maps = simulate_windows(rng, n, FRAMES, tile, optics, camera, emitters=em,
                                               background=np.full(n, 20.0), structured_background=True)
    pred = _predict(model, windows, camera)
    bg_error = []  # each localization's background against the true one at its pixel
    for p, bg in zip(pred, bg_maps, strict=True):
        ix, iy = (np.clip(p[:, :2] // TRAIN["pixel_size_nm"], 0, tile - 1).astype(int)).T
        bg_error.append(p[:, 6] - bg[iy, ix])
    metrics["density_0.5_structured_background"] = {
        **score([t[:, :3] for t in truth], [p[:, :3] for p in pred]),
        "background_median_abs_error_photons": round(float(np.median(np.abs(np.concatenate(bg_error)))), 2)}
    isolated = {}
    for photons in (500, 1000, 2000, 5000):
        n_iso = 200
        em = [np.array([[rng.uniform(1500, 1700), rng.uniform(1500, 1700), 0.0, photons]]) for _ in range(n_iso)]
        windows, truth, _ = simulate_windows(rng, n_iso, FRAMES, 32, optics, camera, emitters=em,
                                             background=np.full(n_iso, 10.0))
        pred = _predict(model, windows, camera)
        s = score([t[:, :3] for t in truth], [p[:, :3] for p in pred])
        sx, _ = astigmatic_sigmas_nm(np.zeros(1), optics)
        crlb = integrated_gaussian_crlb_nm(photons * camera.qe, 10.0 * camera.qe, float(sx[0]), 100.0)
        # shot noise is on detected photoelectrons: the bound uses N·QE and b·QE
        isolated[str(photons)] = {"rmse_x_nm": s["rmse_x_nm"], "crlb_x_nm": round(crlb, 2),
                                  "rmse_over_crlb": round(s["rmse_x_nm"] / crlb, 3), "recall": s["recall"],
                                  "rmse_axial_nm": s["rmse_axial_nm"],
                                  "uncertainty": uncertainty_calibration(truth, pred)}
    metrics["isolated_background_10"] = isolated
    return metrics


def _card_core() -> dict[str, Any]:
    optics = OpticsConfig()
    sx, _ = astigmatic_sigmas_nm(np.zeros(1), optics)
    return {
        "name": "localization",
        "task": "single-molecule localization (x, y, z from the astigmatic PSF, photons)",
        "inputs": [{"name": "frames", "shape": ["N", FRAMES, "H", "W"], "dtype": "float32",
                    "description": f"frames t-{FRAMES - 1}..t (oldest first; a missing one is a copy of the next) "
                                   "in photons (ADU → photons by the camera model), each minus its median if "
                                   "subtract_median, / input_scale_photons; frame t is localized"}],
        "outputs": [{"name": "maps", "shape": ["N", len(CHANNELS), "H", "W"], "channels": list(CHANNELS),
                     "description": "p: detection probability; dx, dy: emitter offset from the pixel centre "
                                    "(px); z: z / z_scale_nm; photons: photons / photon_scale; bg: background "
                                    "minus the frame median, / input_scale_photons; sigma_*: the predicted "
                                    "standard error of dx, dy (px), z, photons (their units)"}],
        "frames": FRAMES,
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
    pupil_family = PupilFamily.draw(np.random.default_rng(seed + 1), PUPIL_MEMBERS, optics)

    def next_batch() -> tuple[torch.Tensor, ...]:
        windows, truth, bg = simulate_windows(rng, batch, FRAMES, tile, optics, camera, structured_background=True,
                                              pupil_family=pupil_family, pupil_share=PUPIL_SHARE)
        u = rng.random(batch)
        windows[u < CONTEXT_DROPOUT["all"], :-1] = windows[u < CONTEXT_DROPOUT["all"], -1:]
        oldest = (u >= CONTEXT_DROPOUT["all"]) & (u < CONTEXT_DROPOUT["all"] + CONTEXT_DROPOUT["oldest"])
        windows[oldest, 0] = windows[oldest, 1]
        median = np.median(windows[:, -1], axis=(-2, -1), keepdims=True)
        tgt, mask = targets(truth, (bg - median) / NORMALISATION["input_scale_photons"])
        x = torch.from_numpy(normalise(windows, NORMALISATION))
        return x, torch.from_numpy(tgt), torch.from_numpy(mask)

    seconds = fit(net, next_batch, loss_fn, steps, log_every=log_every)
    metrics = evaluate(_TorchModel(net), seed, optics, camera)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / f"{model_name(width)}.onnx"
    export_onnx(net, torch.zeros(1, FRAMES, 64, 64), onnx_path, "frames", "maps")
    card = {
        **_card_core(),
        "name": model_name(width),
        "version": 3,
        "file": onnx_path.name,
        "architecture": f"U-Net {width}-{2 * width}-{4 * width}, {FRAMES} frames in, {len(CHANNELS)} maps out",
        "parameters": sum(p.numel() for p in net.parameters()),
        "training": {"seed": seed, "steps": steps, "batch": batch, "optimizer": "AdamW + OneCycle, max lr 2e-3",
                     "data": {**TRAIN, "camera": camera.model_dump(), "optics": optics.model_dump()},
                     "seconds": round(seconds, 1), "torch": torch.__version__},
        "metrics": {"protocol": "the full pipeline (network, decoding, ML refinement of isolated detections) on "
                                f"windows of {FRAMES} frames whose emitters blink (p_stay_on {P_STAY_ON}); "
                                "_one_frame: the same windows, last frame alone; "
                                "greedy nearest-first matching per frame within 250 nm lateral; "
                                "uncertainty: error / reported uncertainty per axis over matches; "
                                "isolated: one emitter per 32x32 tile at z = 0, RMSE in x vs sqrt(CRLB_x) "
                                "of an integrated Gaussian with Poisson noise on N·QE photoelectrons",
                    **metrics},
        "retrain_command": f"smartscope train localization --seed {seed}" + (f" --steps {steps}" if steps != 4000 else "")
        + (f" --width {width}" if width != DEFAULT_WIDTH else ""),
    }
    onnx_path.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return card
