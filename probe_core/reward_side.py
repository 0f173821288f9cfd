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

import math
from dataclasses import dataclass

import torch

from probe_core.estimators import DeltaH1, UnitDots, UnitLayout, cross_unit_delta_h1

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
    U < 3), gradient_term, momentum_term, weight_decay_term; informative_units: units with
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


def delta_j1(dots: UnitDots, kappa: float, informative: int) -> DeltaJ1:
    """δJ₁ from the unit dots of (Z, Y) (`unit_dots(z, y, step, means)`, Z in X's place).

    δH₁'s form with X := Z is Z̄-linear with the opposite sign of ∇J·Δθ, so every term and
    delete-one value is negated; the SE is unchanged."""
    h: DeltaH1 = cross_unit_delta_h1(dots, kappa)
    loo = None if h.leave_one_out is None else -h.leave_one_out
    return DeltaJ1(total=-h.total, se=h.se, gradient_term=-h.gradient_term,
                   momentum_term=-h.momentum_term, weight_decay_term=-h.weight_decay_term,
                   informative_units=informative,
                   se_reliable=h.se is not None and informative >= MIN_INFORMATIVE_UNITS,
                   leave_one_out=loo)


@dataclass
class ExchangeRate:
    """δH₁/δJ₁: the entropy the step spends per unit of mean reward it gains. Fields: value,
    se (delta method with the jackknife covariance of the two totals)."""

    value: float
    se: float


def exchange_rate(dh1: DeltaH1, dj1: DeltaJ1) -> ExchangeRate | None:
    """δH₁/δJ₁ and its delta-method SE, or None unless δJ₁ is clear of zero by one SE (a
    ratio over a denominator that may be zero has no usable SE).

    Var(H/J) ≈ (Var H − 2ρ Cov(H, J) + ρ² Var J)/J², ρ = H/J, with the variances and the
    covariance from the delete-one values of both totals over the same units."""
    if dj1.se is None or dh1.leave_one_out is None or dj1.leave_one_out is None:
        return None
    if not abs(dj1.total) > dj1.se:
        return None
    rho = dh1.total / dj1.total
    u = dh1.leave_one_out.numel()
    dh = dh1.leave_one_out - dh1.leave_one_out.mean()
    dj = dj1.leave_one_out - dj1.leave_one_out.mean()
    cov = lambda a, b: (u - 1) / u * float((a * b).sum())                   # noqa: E731
    var = (cov(dh, dh) - 2 * rho * cov(dh, dj) + rho * rho * cov(dj, dj)) / dj1.total ** 2
    return ExchangeRate(value=rho, se=math.sqrt(max(var, 0.0)))
