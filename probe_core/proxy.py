"""The covariance proxy of Cui et al. 2025, reported beside δH₁ for comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class CovarianceProxy:
    value: float
    se: float | None


def covariance_proxy(s: torch.Tensor, adv: torch.Tensor) -> CovarianceProxy:
    """Cui et al. 2025 (arXiv 2505.22617), sequence level: mean over prompts of the within-group
    covariance Cov_g(S, A). Under natural policy gradient on a tabular softmax policy with step
    η, ΔH ≈ −η·Cov(log π, A). It assumes a tabular (independent per-state) softmax, an NPG /
    plain-gradient step and no AdamW preconditioning, momentum or weight decay, and ignores
    that LoRA couples prompts through shared parameters; δH₁ assumes none of these.

    Args: s, adv: [B, G]. Returns the mean over prompts and its SE across prompts.
    """
    s, adv = s.double(), adv.double()
    g = s.shape[1]
    cov = ((s - s.mean(1, keepdim=True)) * (adv - adv.mean(1, keepdim=True))).sum(1) / (g - 1)
    se = float(cov.std() / math.sqrt(cov.numel())) if cov.numel() > 1 else None
    return CovarianceProxy(float(cov.mean()), se)
