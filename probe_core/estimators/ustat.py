"""δH₁ = ∇H·Δθ from per-unit dot products: the cross-unit U-statistic, its terms and SEs.

∇H is estimated by −X̄ (E[X_u] = −∇H_u exactly, by the leave-one-out baseline). The product of
two batch estimates X̄·(W⊙Ȳ) is biased by the same-unit terms, so the gradient term uses the
U-statistic over unit pairs u≠w (Hoeffding 1948):
    u_cross = [U/(U−1)] X̄·WȲ − [1/(U(U−1))] Σ_u X_u·WY_u.
Everything below works on per-unit dot products (UnitDots), so it runs the same whether the
unit vectors were kept on the host, recomputed in a second pass, or computed by several workers
and concatenated (UnitDots.cat).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from probe_core.adamw import AdamWStep

DOT_BLOCK_BYTES = 2 << 20   # each float64 temporary of unit_dots stays below this


class Concatenable:
    """Per-unit (or per-sequence) dataclasses that concatenate field by field: the reduce of a
    map over shards."""

    @classmethod
    def cat(cls, parts: list):
        """The parts' rows, in order."""
        return concat_units(parts)


@dataclass
class BilinearDots(Concatenable):
    """Per-unit dots of a bilinear form X·(W⊙Y).

    Fields (float64 [U] each): diag X_u·WY_u; x_ybar X_u·WȲ; xbar_y X̄·WY_u.
    """

    diag: torch.Tensor
    x_ybar: torch.Tensor
    xbar_y: torch.Tensor


@dataclass
class UnitDots(Concatenable):
    """Everything δH₁ needs from the unit vectors once the step is known.

    Fields:
        preconditioned: BilinearDots with W = D (reported as `u_statistic`), [U] each
        step_weighted: BilinearDots with W = lr(1−β1)D (the weight of κȲ in Δθ), [U] each
        momentum: X_u·(lr β1 D⊙m), float64 [U]
        decay: X_u·(lr wd θ), float64 [U]
    """

    preconditioned: BilinearDots
    step_weighted: BilinearDots
    momentum: torch.Tensor
    decay: torch.Tensor


def concat_units(parts: list):
    """Concatenate per-unit dataclasses field by field along the unit axis (tensors [U_k]
    → [ΣU_k]; nested dataclasses recursively; None stays None)."""
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return type(first)(**{f.name: concat_units([getattr(p, f.name) for p in parts])
                          for f in dataclasses.fields(first)})


@dataclass
class UnitMeans:
    """X̄ and Ȳ over all units of the job, float64 [P] each."""

    x_bar: torch.Tensor
    y_bar: torch.Tensor


def bilinear_dots(x: torch.Tensor, y: torch.Tensor, weights: list[torch.Tensor],
                  vectors: list[torch.Tensor], means: UnitMeans | None = None
                  ) -> tuple[list[BilinearDots], list[torch.Tensor]]:
    """The dots X_u·WY_u, X_u·WȲ, X̄·WY_u for each weight W and X_u·v for each vector v, from
    fp32 unit vectors x, y [U, P], column block by column block: each float64 temporary is
    ≤ DOT_BLOCK_BYTES (about four live at once) instead of several [U, P] float64 copies.

    Args: weights, vectors: float64 [P] each; means: X̄, Ȳ over all units (default: the means
    of x and y; pass them when x, y hold only some of the units, such as one recomputed unit or
    one worker's shard). Returns the dots per weight and x @ v [U] per v.
    """
    u, p = x.shape
    width = max(1, DOT_BLOCK_BYTES // (8 * u))
    n_w = len(weights)
    zero = [torch.zeros(u, dtype=torch.float64) for _ in range(3 * n_w + len(vectors))]
    diag, x_ybar, xbar_y, lin = zero[:n_w], zero[n_w:2 * n_w], zero[2 * n_w:3 * n_w], \
        zero[3 * n_w:]
    for j in range(0, p, width):
        cols = slice(j, j + width)
        xb, yb = x[:, cols].double(), y[:, cols].double()                # [U, b]
        x_mean = xb.mean(0) if means is None else means.x_bar[cols]      # [b]
        y_mean = yb.mean(0) if means is None else means.y_bar[cols]
        for k, w in enumerate(weights):
            wy = yb * w[cols]                                            # [U, b]
            diag[k] += (xb * wy).sum(1)
            x_ybar[k] += xb @ (w[cols] * y_mean)
            xbar_y[k] += wy @ x_mean
        for k, v in enumerate(vectors):
            lin[k] += xb @ v[cols]
    return [BilinearDots(diag=d, x_ybar=a, xbar_y=b) for d, a, b in zip(diag, x_ybar, xbar_y)], \
        lin


def unit_dots(x: torch.Tensor, y: torch.Tensor, step: AdamWStep,
              means: UnitMeans | None = None) -> UnitDots:
    """UnitDots of unit vectors x, y [U, P] fp32 for the step (a map step: any subset of the
    units gives its own rows, given the job's means)."""
    (preconditioned, step_weighted), (momentum, decay) = bilinear_dots(
        x, y, [step.d, step.w_grad], [step.w_momentum, step.w_decay], means)
    return UnitDots(preconditioned=preconditioned, step_weighted=step_weighted,
                    momentum=momentum, decay=decay)


@dataclass
class UStat:
    """A degree-2 cross-unit U-statistic and its standard errors.

    Fields: value u_cross; bars_dot X̄·WȲ; diag_sum Σ_u X_u·WY_u; rows r_u [U];
    leave_one_out U_(−u) [U] (None when U < 3); se_plugin, zeta1_plugin; se_jackknife,
    zeta1_jackknife (None when U < 3).
    """

    value: float
    bars_dot: float
    diag_sum: float
    rows: torch.Tensor
    leave_one_out: torch.Tensor | None
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
    return UStat(value=value, bars_dot=bars_dot, diag_sum=diag_sum, rows=rows,
                 leave_one_out=loo, se_plugin=se_plugin, zeta1_plugin=zeta1,
                 se_jackknife=se_jk, zeta1_jackknife=zeta1_jk)


@dataclass
class DeltaH1:
    """δH₁ and its parts.

    Fields: total (= the three terms' sum), se (jackknife SE of total, None when U < 3),
    gradient_term, momentum_term, weight_decay_term; u_statistic: the U-statistic with W = D
    (reported as `u_statistic`; None for estimators without one); per_unit: each unit's
    contribution [U] float64 (their mean is total), for the per-prompt view; target: what
    total estimates ("fresh_prompts": the change on prompts drawn like the batch's, by the
    U-statistic; "held_out": on the E batch's prompts, two_batch); se_unconditional (two_batch):
    se plus the U batch's sampling spread of Δθ; leave_one_out: the delete-one totals [U] whose
    jackknife spread is se (None when U < 3), for ratios of two estimates on the same units
    (reward_side.exchange_rate) and paired differences (importance.curvature).
    """

    total: float
    se: float | None
    gradient_term: float
    momentum_term: float
    weight_decay_term: float
    u_statistic: UStat | None
    per_unit: torch.Tensor | None = None
    target: str = "fresh_prompts"
    se_unconditional: float | None = None
    leave_one_out: torch.Tensor | None = None


def cross_unit_delta_h1(dots: UnitDots, kappa: float) -> DeltaH1:
    """δH₁ with the gradient term as a cross-unit U-statistic, and its delete-one jackknife SE
    (the reduce step of `exact` and `blocks`). κ and D are held fixed."""
    reported, u_grad = u_statistic(dots.preconditioned), u_statistic(dots.step_weighted)
    gradient_term = -kappa * u_grad.value
    momentum_term = float(dots.momentum.mean())
    weight_decay_term = float(dots.decay.mean())
    total = gradient_term + momentum_term + weight_decay_term
    linear = dots.momentum + dots.decay                                   # [U]
    se = loo = None
    u = linear.numel()
    if u_grad.leave_one_out is not None:
        # the linear terms' delete-one means: (U·mean − x_u)/(U−1)
        loo_lin = (u * linear.mean() - linear) / (u - 1)
        loo = -kappa * u_grad.leave_one_out + loo_lin                     # [U]
        se = jackknife_se(loo)
    return DeltaH1(total=total, se=se, gradient_term=gradient_term, momentum_term=momentum_term,
                   weight_decay_term=weight_decay_term, u_statistic=reported,
                   per_unit=-kappa * u_grad.rows + linear, leave_one_out=loo)
