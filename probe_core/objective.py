"""The update's per-sequence weights c^Y (GRPO / Dr. GRPO conventions), known before the
gradient pass from the rewards and the response lengths:

    c^Y_{n,g} = A_{n,g} / (G·ℓ_{n,g}),   L = −(1/B) Σ_n Σ_g c^Y S  (the loss the step descends).

The entropy's coefficients need S, so they are formed from the gradient forward
(summaries.py); the unit weight (1/k for a block) is applied there too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe_core import rewards as rw
from probe_core.spec import ObjectiveSpec


@dataclass
class UpdateWeights:
    """Fields: c_y, per-sequence weight of ∇S in Y, float64 [N]; advantages A, float64 [B, G]."""

    c_y: torch.Tensor
    advantages: torch.Tensor


def update_weights(objective: ObjectiveSpec, max_new_tokens: int, rewards: torch.Tensor,
                   lengths: torch.Tensor) -> UpdateWeights:
    """Args: rewards [B, G]; lengths: response tokens [N]."""
    b, g = rewards.shape
    adv = rw.advantages(rewards, objective.advantage, objective.advantage_eps)     # [B, G]
    const = objective.length_norm_constant or max_new_tokens
    ell = rw.length_norm(lengths.view(b, g), objective.length_norm, const)        # [B, G]
    return UpdateWeights(c_y=(adv / (g * ell)).reshape(-1), advantages=adv)
