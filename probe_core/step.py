"""Applying θ + s·Δθ to the trainable parameters and restoring them bit for bit.

The step is applied in place on the device; the only copy is a host clone of the trainable
parameters (a LoRA adapter's size), so no second model ever sits on the device.
"""

from __future__ import annotations

import os

import torch

from probe_core.gradients import FlatParams


class ParameterSwap:
    def __init__(self, flat: FlatParams):
        self.flat = flat
        self.original = [p.detach().to("cpu", copy=True) for p in flat.params]

    def theta(self) -> torch.Tensor:
        """θ as one float64 host vector [P]."""
        return torch.cat([o.reshape(-1).double() for o in self.original])

    @torch.no_grad()
    def apply(self, delta: torch.Tensor, multiplier: float) -> None:
        """Set every trainable parameter to θ + s·Δθ (computed in float64, then cast)."""
        for p, o, off in zip(self.flat.params, self.original, self.flat.offsets):
            d = delta[off:off + p.numel()].view(p.shape)
            p.copy_((o.double() + multiplier * d).to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for p, o in zip(self.flat.params, self.original):
            p.copy_(o)


def save_adapter(model: torch.nn.Module, path: str) -> str:
    """Write the model's adapter (currently at θ⁺) as a PEFT directory."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path
