"""δH₁ = ∇H·Δθ from unit summaries: the cross-unit U-statistic, its terms and standard errors.

∇H is estimated by −X̄ (E[X_u] = −∇H_u exactly, by the leave-one-out baseline). The product of
two batch estimates X̄·(W⊙Ȳ) is biased by the same-unit terms, so the gradient term uses the
U-statistic over unit pairs u≠w (Hoeffding 1948):
    u_cross = [U/(U−1)] X̄·WȲ − [1/(U(U−1))] Σ_u X_u·WY_u.
Everything below works on per-unit dot products, so it runs the same whether the unit vectors
were kept on the host or recomputed in a second pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class BilinearDots:
    """Per-unit dots of a bilinear form X·(W⊙Y), float64 [U] each."""

    diag: torch.Tensor      # X_u·WY_u
    x_ybar: torch.Tensor    # X_u·WȲ
    xbar_y: torch.Tensor    # X̄·WY_u

    @classmethod
    def cat(cls, parts: list[BilinearDots]) -> BilinearDots:
        """The dots of several groups of units, in order."""
        return cls(torch.cat([d.diag for d in parts]), torch.cat([d.x_ybar for d in parts]),
                   torch.cat([d.xbar_y for d in parts]))


def unit_dots(x: torch.Tensor, y: torch.Tensor, weights: list[torch.Tensor],
              vectors: list[torch.Tensor], x_bar: torch.Tensor | None = None,
              y_bar: torch.Tensor | None = None, block_bytes: int = 2 << 20
              ) -> tuple[list[BilinearDots], list[torch.Tensor]]:
    """The per-unit dots X_u·WY_u, X_u·WȲ, X̄·WY_u for each weight W and X_u·v for each vector v,
    from fp32 unit vectors x, y [U, P], column block by column block: each float64 temporary
    is ≤ block_bytes (about four live at once) instead of several [U, P] float64 copies, which
    grew host memory with the batch size.

    Args: weights, vectors: float64 [P] each; x_bar, y_bar: the means over all units, float64
    [P] (default: the means of x and y; pass them when x, y hold only some of the units, such as
    one recomputed unit). Returns the dots per weight and x @ v [U] per v.
    """
    u, p = x.shape
    width = max(1, block_bytes // (8 * u))
    zero = [torch.zeros(u, dtype=torch.float64) for _ in range(3 * len(weights) + len(vectors))]
    diag, x_ybar, xbar_y = zero[:len(weights)], zero[len(weights):2 * len(weights)], \
        zero[2 * len(weights):3 * len(weights)]
    lin = zero[3 * len(weights):]
    for j in range(0, p, width):
        cols = slice(j, j + width)
        xb, yb = x[:, cols].double(), y[:, cols].double()                # [U, b]
        x_mean = xb.mean(0) if x_bar is None else x_bar[cols]            # [b]
        y_mean = yb.mean(0) if y_bar is None else y_bar[cols]
        for k, w in enumerate(weights):
            wy = yb * w[cols]                                            # [U, b]
            diag[k] += (xb * wy).sum(1)
            x_ybar[k] += xb @ (w[cols] * y_mean)
            xbar_y[k] += wy @ x_mean
        for k, v in enumerate(vectors):
            lin[k] += xb @ v[cols]
    return [BilinearDots(d, a, b) for d, a, b in zip(diag, x_ybar, xbar_y)], lin


@dataclass
class UStat:
    value: float
    bars_dot: float
    diag_sum: float
    rows: torch.Tensor          # r_u [U]
    leave_one_out: torch.Tensor | None   # U_(−u) [U], None when U < 3
    se_plugin: float | None
    zeta1_plugin: float | None
    se_jackknife: float | None
    zeta1_jackknife: float | None


def jackknife_se(estimates: torch.Tensor) -> float:
    """Delete-one jackknife SE: √((U−1)/U · Σ (θ_(−u) − θ_(·))²)."""
    u = estimates.numel()
    return math.sqrt((u - 1) / u * float(((estimates - estimates.mean()) ** 2).sum()))


def u_statistic(dots: BilinearDots) -> UStat:
    """The cross-unit U-statistic, plug-in and jackknife SEs (None where undefined)."""
    u = dots.diag.numel()
    if u < 2:
        raise ValueError("the U-statistic needs at least 2 units")
    bars_dot = float(dots.x_ybar.mean())
    diag_sum = float(dots.diag.sum())
    value = u / (u - 1) * bars_dot - diag_sum / (u * (u - 1))
    rows = (u * dots.x_ybar + u * dots.xbar_y - 2 * dots.diag) / (2 * (u - 1))   # [U]
    zeta1 = float(((rows - value) ** 2).sum()) / (u - 1)
    se_plugin = math.sqrt(4 * zeta1 / u)
    loo = se_jk = zeta1_jk = None
    if u >= 3:
        loo = (u * value - 2 * rows) / (u - 2)                            # [U]
        se_jk = jackknife_se(loo)
        zeta1_jk = u * se_jk ** 2 / 4
    return UStat(value, bars_dot, diag_sum, rows, loo, se_plugin, zeta1, se_jk, zeta1_jk)


@dataclass
class DeltaH1:
    total: float
    se: float | None
    gradient_term: float
    momentum_term: float
    weight_decay_term: float
    u_plain: UStat          # with W = D (reported as u_statistic)


def delta_h1(plain: BilinearDots, grad: BilinearDots, x_momentum: torch.Tensor,
             x_decay: torch.Tensor, kappa: float) -> DeltaH1:
    """δH₁ and its jackknife SE.

    Args:
        plain: dots with W = D; grad: dots with W = lr(1−β1)D (equal up to the scalar for one
        param group); x_momentum: X_u·(lr β1 D⊙m) [U]; x_decay: X_u·(lr wd θ) [U]; kappa: κ.
    """
    u_plain, u_grad = u_statistic(plain), u_statistic(grad)
    gradient_term = -kappa * u_grad.value
    momentum_term = float(x_momentum.mean())
    weight_decay_term = float(x_decay.mean())
    total = gradient_term + momentum_term + weight_decay_term
    se = None
    u = x_momentum.numel()
    if u_grad.leave_one_out is not None:
        # the linear terms' delete-one means: (U·mean − x_u)/(U−1)
        loo_lin = (u * (x_momentum + x_decay).mean() - (x_momentum + x_decay)) / (u - 1)
        se = jackknife_se(-kappa * u_grad.leave_one_out + loo_lin)
    return DeltaH1(total, se, gradient_term, momentum_term, weight_decay_term, u_plain)


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
