"""What the three trainers share: the 2D U-Net backbone, the training loop, the ONNX export.

Each model's own module keeps what differs: its data, targets, loss, head,
evaluation and model card.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))


class UNet2d(nn.Module):
    """Two-level U-Net (w, 2w, 4w channels) → full-resolution features (w channels).

    Input height and width must be multiples of 4 (the card's input_multiple_px).
    """

    def __init__(self, in_channels: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.mid = conv_block(in_channels, w), conv_block(w, 2 * w), conv_block(2 * w, 4 * w)
        self.dec2, self.dec1 = conv_block(6 * w, 2 * w), conv_block(3 * w, w)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up(m), e2], 1))
        return self.dec1(torch.cat([self.up(d2), e1], 1))


def fit(net: nn.Module, next_batch: Callable[[], tuple[torch.Tensor, ...]],
        loss_fn: Callable[..., torch.Tensor], steps: int, *, lr: float = 2e-3, log_every: int = 100,
        resume: dict | None = None, after_step: Callable[[int, torch.optim.Optimizer, object], None] | None = None,
        ) -> float:
    """AdamW + one-cycle schedule; `loss_fn(net(x), *targets)` on `next_batch() -> (x, *targets)`.

    `resume`: a checkpoint's {"step", "optimizer", "scheduler"} states, to go on
    after that step (a long CPU run spans sessions); `after_step(step, opt, sched)`
    runs after each step (checkpoints). Prints the smoothed loss and the time left
    every `log_every` steps; returns the seconds spent.
    """
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    first = 1
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        first = resume["step"] + 1
    t0 = time.time()
    running = 0.0
    for step in range(first, steps + 1):
        net.train()
        x, *targets = next_batch()
        loss = loss_fn(net(x), *targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running = 0.98 * running + 0.02 * loss.item() if step > first else loss.item()
        if after_step is not None:
            after_step(step, opt, sched)
        if step % log_every == 0 or step == steps:
            eta = (time.time() - t0) / (step - first + 1) * (steps - step)
            print(f"step {step}/{steps}  loss {running:.4f}  eta {eta:.0f}s", flush=True)
    net.eval()
    return time.time() - t0


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str, *,
                batch_axis: bool = True) -> None:
    """Export with the last two axes (height, width) dynamic, and the batch axis
    too when `batch_axis` (a worker that falls behind runs several frames at once)."""
    nd_in, nd_out = example.dim(), net(example).dim()
    net.eval()
    batch = {0: "N"} if batch_axis else {}
    torch.onnx.export(net, example, str(path), dynamo=False, opset_version=17,
                      input_names=[input_name], output_names=[output_name],
                      dynamic_axes={input_name: {**batch, nd_in - 2: "H", nd_in - 1: "W"},
                                    output_name: {**batch, nd_out - 2: "H", nd_out - 1: "W"}})


def seed_everything(seed: int) -> None:
    """Same seed, same model: one thread (no OpenMP oversubscription on a shared machine either)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
