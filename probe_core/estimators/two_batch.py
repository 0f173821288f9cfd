"""`two_batch` mode (issue 14): the step Δθ from the U batch, the entropy and its change from a
held-out E batch.

Single-batch δH₁ drops same-unit pairs, so it targets the change on fresh prompts, while the
single-batch realized ΔH (SNIS on the very responses that built Δθ) adds each prompt's effect on
itself and a same-response term, both O(1/B). With an E batch sampled independently of the U
batch, −X̄_E is independent of Δθ_U, so

    δH₁ = ∇H_E·Δθ_U ≈ mean_u d_u,   d_u = −κ X_u·(W⊙Ȳ_U) + X_u·(lr β1 D⊙m) + X_u·(lr wd θ)

needs no U-statistic: it is a plain mean over E units, unbiased for ∇H_E·Δθ conditional on the U
batch's step, with SE = sd(d_u)/√U_E. `se_unconditional` adds the U batch's sampling spread of
Δθ's gradient part, κ²·var_w(X̄_E·(W⊙Y_w))/U_U (delta method, D and κ held fixed).
"""

from __future__ import annotations

import math

import torch

from probe_core.estimators.exact import MIN_UNITS, ExactEstimator
from probe_core.estimators.ustat import DeltaH1, UnitDots


class TwoBatchEstimator(ExactEstimator):
    """Units are prompts in both batches (the `exact` layout): the U batch's give Ȳ (and the
    unconditional SE's spread), the E batch's give X_u and δH₁."""

    mode = "two_batch"

    def delta_h1(self, dots: UnitDots, kappa: float) -> DeltaH1:
        """δH₁ from the E units' dots, taken against the U batch's means (x_ybar = X_u·WȲ_U)."""
        gradient = -kappa * dots.step_weighted.x_ybar                          # [U_E]
        per_unit = gradient + dots.momentum + dots.decay                       # [U_E]
        u = per_unit.numel()
        se = float(per_unit.std()) / math.sqrt(u) if u >= MIN_UNITS else None
        return DeltaH1(total=float(per_unit.mean()), se=se,
                       gradient_term=float(gradient.mean()),
                       momentum_term=float(dots.momentum.mean()),
                       weight_decay_term=float(dots.decay.mean()), u_statistic=None,
                       per_unit=per_unit, target="held_out",
                       leave_one_out=(u * per_unit.mean() - per_unit) / (u - 1))


def unconditional_se(conditional_se: float | None, kappa: float,
                     xbar_e_dot_wy: torch.Tensor | None) -> float | None:
    """SE of δH₁ over both batches' sampling: the E units' spread plus the U batch's spread of
    the gradient term. Args: xbar_e_dot_wy: X̄_E·(W⊙Y_w) for each U unit w, float64 [U_U] (None
    when the U unit vectors were not kept)."""
    if conditional_se is None or xbar_e_dot_wy is None or xbar_e_dot_wy.numel() < MIN_UNITS:
        return None
    u_spread = kappa ** 2 * float(xbar_e_dot_wy.var()) / xbar_e_dot_wy.numel()
    return math.sqrt(conditional_se ** 2 + u_spread)
