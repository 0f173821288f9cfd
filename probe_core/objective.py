"""Per-sequence coefficients of the two gradient summaries: c^X (the entropy's, with the
leave-one-out baseline) and c^Y (the update loss's, GRPO / Dr. GRPO conventions).

    c^Y_{n,g} = A_{n,g} / (G·ℓ_{n,g}),   c^X_{n,g} = (S_{n,g} − S̄_{n,−g}) / G,
each multiplied by its prompt's weight in its unit (1/k for a block of k prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe_core import rewards as rw
from probe_core.estimators import UnitLayout
from probe_core.spec import ObjectiveSpec


@dataclass
class Coefficients:
    """Fields: c_x, c_y: per-sequence coefficients, float64 [N] (unit weight folded in);
    advantages: A, float64 [B, G]."""

    c_x: torch.Tensor
    c_y: torch.Tensor
    advantages: torch.Tensor


def coefficients(objective: ObjectiveSpec, max_new_tokens: int, rewards: torch.Tensor,
                 lengths: torch.Tensor, s: torch.Tensor, layout: UnitLayout) -> Coefficients:
    """Args: rewards [B, G]; lengths: response tokens [N]; s: S [N]."""
    b, g = rewards.shape
    adv = rw.advantages(rewards, objective.advantage, objective.advantage_eps)     # [B, G]
    const = objective.length_norm_constant or max_new_tokens
    ell = rw.length_norm(lengths.view(b, g), objective.length_norm, const)        # [B, G]
    c_y = adv / (g * ell)
    s = s.double().view(b, g)
    loo_mean = (s.sum(1, keepdim=True) - s) / (g - 1)                             # S̄_{n,−g}
    c_x = (s - loo_mean) / g
    weight = layout.sequence_weight()                                             # [N]
    return Coefficients(c_x=c_x.reshape(-1) * weight, c_y=c_y.reshape(-1) * weight,
                        advantages=adv)
