"""Self-normalized importance sampling of the entropy after a step, with ESS and PSIS k̂.

The responses were drawn from π_θ; after the step θ⁺ their weights are w = π_θ⁺/π_θ =
exp(S⁺ − S). Ĥ(θ⁺) = −Σ ŵ S⁺ with ŵ = w/Σw over all B·G samples (`global`) or within each
prompt (`per_prompt`). With G responses per prompt and the same G for all prompts, the global
ratio estimates the prompt-averaged entropy and pools the normalizer over B·G samples, which
makes it far less noisy than G-sample per-prompt ratios (its bias is O(1/(B·G)) instead of
O(1/G)).

PSIS k̂: the shape of a generalized Pareto distribution fitted to the largest weights (Vehtari,
Simpson, Gelman, Yao, Gabry 2024, "Pareto Smoothed Importance Sampling", JMLR 25(72)), fitted by
the empirical-Bayes estimator of Zhang & Stephens (2009, Technometrics 51(3)). k̂ < 0.5: fine;
0.5–0.7: usable but slow to converge; > 0.7: the estimate is unreliable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RewardChange:
    """J(θ⁺) − J(θ) on the same responses, rewards fixed per response."""

    j_after: float
    delta_j: float
    se: float | None


@dataclass
class SnisEstimate:
    h_after: float
    delta_h: float
    se: float | None
    ess: float
    ess_fraction: float
    psis_k: float | None
    reward: RewardChange | None = None     # the mean reward's change on the same weights
    influence: torch.Tensor | None = None  # per-sequence linearization of delta_h [B, G]
    curvature: Curvature | None = None     # delta_h − s·δH₁, paired per unit


@dataclass
class Curvature:
    """ΔH(s) − s·δH₁ (where first order stops holding) and its SE, paired per unit."""

    value: float
    se: float | None


def entropy_before(s: torch.Tensor) -> tuple[float, float | None]:
    """Ĥ(θ) = −mean S and its SE, with prompts as strata. Args: s [B, G]."""
    s = s.double()
    b, g = s.shape
    return float(-s.mean()), _stratified_se(-s)


def _stratified_se(phi: torch.Tensor) -> float | None:
    """SE of mean(phi) for [B, G] values, G i.i.d. draws per fixed prompt:
    √(Σ_n var_n / (B²·G)) with within-prompt sample variances. With one draw per prompt (a
    held-out batch, G = 1) the prompts themselves are the i.i.d. draws: one stratum of B."""
    if phi.shape[1] == 1:
        phi = phi.reshape(1, -1)
    b, g = phi.shape
    if g < 2:
        return None
    var_n = phi.var(dim=1, unbiased=True)                                 # [B]
    value = math.sqrt(float(var_n.sum()) / (b * b * g))
    return value if math.isfinite(value) else None


def gpd_shape(tail: torch.Tensor) -> float:
    """Zhang–Stephens estimate of the generalized Pareto shape k of exceedances `tail` (> 0),
    with the weakly informative prior on k used by PSIS. Larger k: heavier tail."""
    x = torch.sort(tail.double()).values
    n = x.numel()
    prior_bs, prior_k = 3.0, 10.0
    m = 30 + int(math.sqrt(n))
    j = torch.arange(1, m + 1, dtype=torch.float64)
    # candidate θ (b in Zhang & Stephens) on a grid placed by the quartile and the maximum
    b = 1 - torch.sqrt(m / (j - 0.5))
    b = b / (prior_bs * x[int(n / 4 + 0.5) - 1]) + 1 / x[-1]                 # [m]
    k = torch.log1p(-b[:, None] * x[None, :]).mean(1)                      # [m]
    log_lik = n * (torch.log(-b / k) - k - 1)                              # [m]
    weights = 1 / torch.exp(log_lik[None, :] - log_lik[:, None]).sum(1)    # posterior [m]
    b_post = float((b * weights).sum() / weights.sum())
    k_post = float(torch.log1p(-b_post * x).mean())
    return (n * k_post + prior_k * 0.5) / (n + prior_k)


def psis_k(log_w: torch.Tensor) -> float | None:
    """k̂ of the largest M = ⌈min(S/5, 3√S)⌉ weights; None when there are too few samples."""
    s = log_w.numel()
    m = math.ceil(min(0.2 * s, 3 * math.sqrt(s)))
    if m < 5:
        return None
    lw = torch.sort(log_w.double()).values
    lw = lw - lw[-1]
    tail = torch.exp(lw[-m:]) - torch.exp(lw[-m - 1])                    # exceedances ≥ 0
    if float(tail.max()) <= 0:     # all weights equal: no tail to fit
        return None
    tail = tail.clamp(min=float(tail.max()) * 1e-12)
    k = gpd_shape(tail)
    return k if math.isfinite(k) else None


def _snis_mean(log_w: torch.Tensor, f: torch.Tensor, normalization: str
               ) -> tuple[float, torch.Tensor]:
    """Σ ŵ f, the self-normalized weighted mean of per-sample values f after the step, and each
    sample's influence φ = (w/w̄)(f − Σŵf) (within its prompt for `per_prompt`): the delta-method
    linearization of the ratio, whose stratified spread gives the SE.

    Args: log_w, f: [B, G] float64. Returns (the mean over prompts, φ [B, G]).
    """
    if normalization == "global":
        w = torch.exp(log_w - log_w.max())
        after = (w * f).sum() / w.sum()
        phi = w * (f - after) / w.mean()                                   # [B, G]
        return float(after), phi
    if normalization == "per_prompt":
        w = torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)
        after_n = (w * f).sum(1, keepdim=True) / w.sum(1, keepdim=True)    # [B, 1]
        phi = w * (f - after_n) / w.mean(dim=1, keepdim=True)
        return float(after_n.mean()), phi
    raise ValueError(f"unknown normalization {normalization!r}")


def reward_change(s: torch.Tensor, s_after: torch.Tensor, rewards: torch.Tensor,
                  normalization: str) -> RewardChange:
    """The mean reward after the step by SNIS, Ĵ(θ⁺) = Σ ŵ R, against Ĵ(θ) = mean R, with the
    delta-method SE of the difference (prompts as strata).

    Args: s, s_after, rewards: [B, G]."""
    r = rewards.double()
    j_after, phi = _snis_mean(s_after.double() - s.double(), r, normalization)
    return RewardChange(j_after, j_after - float(r.mean()), _stratified_se(phi - r))


def snis(s: torch.Tensor, s_after: torch.Tensor, normalization: str, psis: bool,
         rewards: torch.Tensor | None = None) -> SnisEstimate:
    """Entropy after the step and its change; with rewards, the mean reward's change too.
    Args: s, s_after, rewards [B, G] (float)."""
    s, s_after = s.double(), s_after.double()
    b, g = s.shape
    log_w = s_after - s                                                    # [B, G]
    h_after, phi = _snis_mean(log_w, -s_after, normalization)
    h_before = float(-s.mean())
    # delta method: ΔH ≈ mean(φ) − mean(−S), the linearized ratio minus the plain mean
    se = _stratified_se(phi + s)
    wf = torch.exp(log_w - log_w.max()).reshape(-1)
    ess = float(wf.sum() ** 2 / (wf * wf).sum())
    k = psis_k(log_w.reshape(-1)) if psis else None
    reward = None if rewards is None else reward_change(s, s_after, rewards, normalization)
    return SnisEstimate(h_after, h_after - h_before, se, ess, ess / (b * g), k, reward,
                        influence=phi + s)


def curvature(est: SnisEstimate, multiplier: float, delta_h1) -> Curvature | None:
    """ΔH(s) − s·δH₁ with an SE from the units' paired influences: per unit u, the mean of its
    sequences' linearized ΔH minus s times δH₁'s jackknife pseudo-value (for two_batch's plain
    mean that is d_u itself). Both terms are measured on the same responses, so their shared
    noise cancels and the SE is small even when each term's is not. Units are treated as i.i.d.
    draws (prompts from their distribution). Args: delta_h1: the job's DeltaH1."""
    value = est.delta_h - multiplier * delta_h1.total
    loo = delta_h1.leave_one_out
    if loo is None or est.influence is None:
        return Curvature(value, None)
    units = loo.numel()
    pseudo = units * delta_h1.total - (units - 1) * loo                          # [U]
    paired = est.influence.reshape(units, -1).mean(1) - multiplier * pseudo      # [U]
    se = float(paired.std()) / math.sqrt(units)
    return Curvature(value, se if math.isfinite(se) else None)
