"""The reward side of the step (issue 15): δJ₁ = ∇J·Δθ for the mean reward J = E_p E_y[R] of
the U batch, and the exchange rate δH₁/δJ₁.

∇J from leave-one-out reward baselines: Z_n = Σ_g c^Z ∇S_g with c^Z = (R_g − R̄_{n,−g})/G, so
E[Z_n] = ∇J_n exactly (the baseline does not depend on response g; E[∇S] = 0). Z_u is the
weighted sum of its prompts' Z_n like X_u. δJ₁ is then δH₁'s estimator with X_u replaced by
−Z_u (∇H is estimated by −X̄, ∇J by +Z̄): the same cross-unit U-statistic against Δθ, the same
terms, the same delete-one jackknife.

When is its SE to be trusted? A prompt whose G rewards are all equal has c^Z = 0 and c^Y = 0:
its unit carries no reward signal and adds exact zeros to every kernel. With sparse 0/1 rewards
only a few units are informative, the U-statistic's pairs with signal are few, and the
linearized (jackknife) SE is itself noisy and correlated with the estimate. In the 6-token
world (tests/test_delta_j1_calibration.py; reward mean 0.06, B = 16) the spread of
(δJ₁ − exact)/SE over seeds is ≈ 0.9–1.1 when at least MIN_INFORMATIVE_UNITS units carry
signal, ≈ 1.7 with 2–3 and ≈ 3 with fewer (SE = 0 with one). The unbiased U-statistic variance
with the second-order (degenerate) term does not help there: it is built from the same few
pairs (the closing note of issue 15 has the numbers). So `se_reliable` says whether enough
units carry signal.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from probe_core.adamw import AdamWStep
from probe_core.estimators import (DeltaH1, UnitDots, UnitLayout, UnitMeans, cross_unit_delta_h1,
                                   jackknife_se, u_statistic, unit_dots)
from probe_core.estimators.ustat import concat_units

MIN_INFORMATIVE_UNITS = 4     # units with a non-constant reward before δJ₁'s SE is trusted
MIN_UNITS_FOR_SE = 3


def reward_weights(rewards: torch.Tensor) -> torch.Tensor:
    """c^Z = (R_g − R̄_{n,−g})/G per sequence, the leave-one-out weight of ∇S in Z_n.

    Args: rewards [B, G]. Returns float64 [B·G] (batch order, no unit weight)."""
    r = rewards.double()
    g = r.shape[1]
    loo_mean = (r.sum(1, keepdim=True) - r) / (g - 1)                          # R̄_{n,−g}
    return ((r - loo_mean) / g).reshape(-1)


def informative_units(rewards: torch.Tensor, layout: UnitLayout) -> int:
    """Units holding at least one prompt whose rewards are not all equal. Args: rewards [B, G]."""
    varies = (rewards != rewards[:, :1]).any(1)                                # [B]
    return sum(bool(varies[p].any()) for p in layout.prompts)


@dataclass
class DeltaJ1:
    """δJ₁ = ∇J·Δθ and its parts (the δH₁ terms with ∇J in place of ∇H).

    Fields: total (the sum of the terms), se (delete-one jackknife over units; None when
    U < 3), gradient_term, momentum_term, weight_decay_term, entropy_bonus_term (the part
    of the step TRL's entropy bonus adds; 0 without one); informative_units: units with
    a non-constant reward; se_reliable: se is usable (informative_units ≥
    MIN_INFORMATIVE_UNITS and se defined); leave_one_out: delete-one totals [U] (None when
    U < 3).
    """

    total: float
    se: float | None
    gradient_term: float
    momentum_term: float
    weight_decay_term: float
    informative_units: int
    se_reliable: bool
    leave_one_out: torch.Tensor | None
    entropy_bonus_term: float = 0.0


def delta_j1(dots: UnitDots, kappa: float, informative: int, bonus_term: float = 0.0
             ) -> DeltaJ1:
    """δJ₁ from the unit dots of (Z, Y) (`unit_dots(z, y, step, means)`, Z in X's place; Y
    with the entropy bonus folded in, whose part `bonus_term` is reported on its own).

    δH₁'s form with X := Z is Z̄-linear with the opposite sign of ∇J·Δθ, so every term and
    delete-one value is negated; the SE is unchanged."""
    h: DeltaH1 = cross_unit_delta_h1(dots, kappa)
    loo = None if h.leave_one_out is None else -h.leave_one_out
    return DeltaJ1(total=-h.total, se=h.se, gradient_term=-h.gradient_term - bonus_term,
                   momentum_term=-h.momentum_term, weight_decay_term=-h.weight_decay_term,
                   entropy_bonus_term=bonus_term, informative_units=informative,
                   se_reliable=h.se is not None and informative >= MIN_INFORMATIVE_UNITS,
                   leave_one_out=loo)


@dataclass
class ExchangeRate:
    """δH₁/δJ₁: the entropy the step spends per unit of mean reward it gains. Fields: value,
    se (delta method with the jackknife covariance of the two totals)."""

    value: float
    se: float


def exchange_rate(dh1: DeltaH1, dj1: DeltaJ1, independent: bool = False
                  ) -> ExchangeRate | None:
    """δH₁/δJ₁ and its delta-method SE, or None unless δJ₁ is clear of zero by one SE (a
    ratio over a denominator that may be zero has no usable SE).

    Var(H/J) ≈ (Var H − 2ρ Cov(H, J) + ρ² Var J)/J², ρ = H/J, with the variances and the
    covariance from the delete-one values of both totals over the same units; `independent`
    (two-batch mode: δH₁ from the E batch, δJ₁ from the U batch): Cov = 0, Var = SE²."""
    if dj1.se is None or not abs(dj1.total) > dj1.se:
        return None
    rho = dh1.total / dj1.total
    if independent:
        if dh1.se is None:
            return None
        var = (dh1.se ** 2 + rho * rho * dj1.se ** 2) / dj1.total ** 2
        return ExchangeRate(value=rho, se=math.sqrt(var))
    if dh1.leave_one_out is None or dj1.leave_one_out is None:
        return None
    u = dh1.leave_one_out.numel()
    dh = dh1.leave_one_out - dh1.leave_one_out.mean()
    dj = dj1.leave_one_out - dj1.leave_one_out.mean()
    cov = lambda a, b: (u - 1) / u * float((a * b).sum())                   # noqa: E731
    var = (cov(dh, dh) - 2 * rho * cov(dh, dj) + rho * rho * cov(dj, dj)) / dj1.total ** 2
    return ExchangeRate(value=rho, se=math.sqrt(max(var, 0.0)))


# -- the entropy bonus (TRL entropy_coef) and the coefficient for a target -------------------
#
# TRL's loss is L − c·H_tok with H_tok = Σ_i Σ_t h_it / T_tot differentiated through the logits
# only, so the step's direction gains c·∇H_tok = c·(B/T_tot)·P̄ with P_u = Σ_n w_n Σ_g ∇E_ng,
# E = Σ_t h_t (summaries.BONUS). Folded into Y_u (Y_u + c·s·P_u, s = B/T_tot), every estimate of
# the step (δH₁, δJ₁) includes the bonus; their bonus terms are the cross-unit U-statistics of
# X_u·W·P_w (resp. Z_u·W·P_w) times −κ·c·s (resp. +κ·c·s), with W = lr(1−β1)D held fixed.


def bonus_scale(lengths: torch.Tensor, num_prompts: int) -> float:
    """s = B/T_tot: TRL's bonus gradient is s·P̄. Args: lengths: response tokens [N]."""
    return num_prompts / float(lengths.double().sum().clamp(min=1))


def fold_bonus(vectors: dict[str, torch.Tensor], update: str, bonus: str, weight: float
               ) -> None:
    """Y ← Y + weight·P in place (weight = c·s), for unit vectors [U, P] or one unit [P]."""
    if weight:
        vectors[update].add_(vectors[bonus], alpha=weight)


@dataclass
class RewardDots:
    """The unit dots of the reward side (map outputs, concatenated like UnitDots).

    Fields: reward: Z against Y (Y with the bonus folded in); bonus_x, bonus_z: X, resp. Z,
    against P (None without a bonus)."""

    reward: UnitDots
    bonus_x: UnitDots | None
    bonus_z: UnitDots | None

    @classmethod
    def cat(cls, parts: list[RewardDots]) -> RewardDots:
        return concat_units(parts)


@dataclass
class RewardMeans:
    """Means over all units, float64 [P]: x_bar X̄, y_bar Ȳ (bonus folded), z_bar Z̄, p_bar P̄
    (None without a bonus)."""

    x_bar: torch.Tensor
    y_bar: torch.Tensor
    z_bar: torch.Tensor
    p_bar: torch.Tensor | None


def reward_dots(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, p: torch.Tensor | None,
                step: AdamWStep, means: RewardMeans) -> RewardDots:
    """RewardDots of unit vectors [U_s, P] (all units, or one recomputed unit, given the job's
    means)."""
    reward = unit_dots(z, y, step, UnitMeans(x_bar=means.z_bar, y_bar=means.y_bar))
    if p is None:
        return RewardDots(reward=reward, bonus_x=None, bonus_z=None)
    return RewardDots(reward=reward,
                      bonus_x=unit_dots(x, p, step, UnitMeans(x_bar=means.x_bar,
                                                              y_bar=means.p_bar)),
                      bonus_z=unit_dots(z, p, step, UnitMeans(x_bar=means.z_bar,
                                                              y_bar=means.p_bar)))


@dataclass
class CoefficientForTarget:
    """The entropy_coef c* at which δH₁ (first order, D and κ held at this step's) equals the
    requested target: value, se (delete-one jackknife over units)."""

    value: float
    se: float


@dataclass
class BonusTerms:
    """Fields: coef c; scale s = B/T_tot; delta_h1: δH₁'s bonus term −κ·c·s·u(X, W, P);
    delta_j1: δJ₁'s +κ·c·s·u(Z, W, P); slope: dδH₁/dc = −κ·s·u(X, W, P) and its delete-one
    values [U] (None when U < 3)."""

    coef: float
    scale: float
    delta_h1: float
    delta_j1: float
    slope: float
    slope_leave_one_out: torch.Tensor | None


def bonus_terms(dots: RewardDots, kappa: float, coef: float, scale: float) -> BonusTerms:
    ux = u_statistic(dots.bonus_x.step_weighted)
    uz = u_statistic(dots.bonus_z.step_weighted)
    loo = None if ux.leave_one_out is None else -kappa * scale * ux.leave_one_out
    return BonusTerms(coef=coef, scale=scale, delta_h1=-kappa * coef * scale * ux.value,
                      delta_j1=kappa * coef * scale * uz.value, slope=-kappa * scale * ux.value,
                      slope_leave_one_out=loo)


def coefficient_for_target(dh1: DeltaH1, bonus: BonusTerms, target: float
                           ) -> CoefficientForTarget | None:
    """c* = c + (target − δH₁)/slope, δH₁ linear in c with D and κ fixed; None unless the slope
    is clear of zero by one jackknife SE (or with fewer than 3 units)."""
    loo = bonus.slope_leave_one_out
    if loo is None or dh1.leave_one_out is None:
        return None
    if not abs(bonus.slope) > jackknife_se(loo):
        return None
    value = bonus.coef + (target - dh1.total) / bonus.slope
    per_unit = bonus.coef + (target - dh1.leave_one_out) / loo                     # [U]
    return CoefficientForTarget(value=value, se=jackknife_se(per_unit))


@dataclass
class RewardOutcome:
    """The reward side of a probe: delta_j1; exchange_rate (None unless δJ₁ is clear of zero);
    entropy_bonus_term: δH₁'s part from the bonus (0 without one; δH₁.gradient_term excludes
    it); entropy_coef_for_target (None unless requested and the slope is clear of zero)."""

    delta_j1: DeltaJ1
    exchange_rate: ExchangeRate | None
    entropy_bonus_term: float
    entropy_coef_for_target: CoefficientForTarget | None


def reward_outcome(dh1: DeltaH1, dots: RewardDots, kappa: float, informative: int,
                   coef: float, scale: float, target: float | None
                   ) -> tuple[DeltaH1, RewardOutcome]:
    """The reward side from its dots, and δH₁ with its bonus part split off its gradient term
    (δH₁'s total already includes it: Y carries the folded bonus)."""
    bonus = bonus_terms(dots, kappa, coef, scale) if dots.bonus_x is not None else None
    h_bonus = bonus.delta_h1 if bonus else 0.0
    dj1 = delta_j1(dots.reward, kappa, informative, bonus.delta_j1 if bonus else 0.0)
    dh1 = dataclasses.replace(dh1, gradient_term=dh1.gradient_term - h_bonus)
    target_coef = None
    if target is not None and bonus is not None:
        target_coef = coefficient_for_target(dh1, bonus, target)
    return dh1, RewardOutcome(delta_j1=dj1, exchange_rate=exchange_rate(dh1, dj1),
                              entropy_bonus_term=h_bonus, entropy_coef_for_target=target_coef)
