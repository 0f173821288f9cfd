"""Self-normalized importance sampling of the entropy after a step, with ESS and PSIS k̂.

The responses were drawn from π_θ; after the step θ⁺ their weights are w = π_θ⁺/π_θ =
exp(S⁺ − S). Each sequence carries an entropy value f⁺ (Σ_t h_t at θ⁺ on the same prefixes for
`full_vocabulary`, −S⁺ for `sampled`) and a length L (T for `token_mean`, 1 for `sequence`):
Ĥ(θ⁺) = Σ ŵ f⁺ / Σ ŵ L with ŵ = w/Σw over all B·G samples (`global`) or within each prompt
(`per_prompt`); Ĥ(θ) = Σ f / Σ L. With sequence + sampled this is the first round's
Ĥ(θ⁺) = −Σ ŵ S⁺. With G responses per prompt and the same G for all prompts, the global
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
    """Fields: h_after Ĥ(θ⁺); delta_h Ĥ(θ⁺) − Ĥ(θ); se (delta method, None where undefined);
    ess (Σw)²/Σw²; ess_fraction ESS/(B·G); psis_k k̂ (None when not computed)."""

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


@dataclass
class EntropySample:
    """A batch's per-sequence entropy values at one θ, float64 [B, G] each.

    Fields: value f (Σ_t h_t, or −S for `sampled`); length L (T for token_mean, 1 for
    sequence); so that Ĥ = Σ ŵ f / Σ ŵ L. log_weight: log π_θ(y)/π_θ₀(y) of the responses
    drawn at θ₀ (0 there).
    """

    value: torch.Tensor
    length: torch.Tensor
    log_weight: torch.Tensor


def entropy_before(before: EntropySample) -> tuple[float, float | None]:
    """Ĥ(θ) = Σ f / Σ L and its SE (delta method, prompts as strata)."""
    f, ell = before.value, before.length
    h = float(f.sum() / ell.sum())
    return h, _stratified_se((f - h * ell) / ell.mean())


def per_prompt_entropy(before: EntropySample) -> torch.Tensor:
    """Each prompt's own Ĥ_n(θ) = Σ_g f / Σ_g L, float64 [B]."""
    return before.value.sum(1) / before.length.sum(1)


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


def reward_change(log_w: torch.Tensor, rewards: torch.Tensor, normalization: str
                  ) -> RewardChange:
    """The mean reward after the step by SNIS, Ĵ(θ⁺) = Σ ŵ R, against Ĵ(θ) = mean R, with the
    delta-method SE of the difference (prompts as strata).

    Args: log_w (log π_θ⁺/π_θ of the responses), rewards: [B, G]."""
    r = rewards.double()
    j_after, phi = _snis_mean(log_w, r, normalization)
    return RewardChange(j_after, j_after - float(r.mean()), _stratified_se(phi - r))


def snis(before: EntropySample, after: EntropySample, normalization: str, psis: bool,
         rewards: torch.Tensor | None = None) -> SnisEstimate:
    """Entropy after the step, Ĥ(θ⁺) = Σ ŵ f⁺ / Σ ŵ L (the ratio of the two self-normalized
    means), and its change from Ĥ(θ); the weights are w = exp(log_weight) of `after`,
    normalized over all B·G samples (`global`) or within each prompt (`per_prompt`). With
    rewards [B, G], the mean reward's change on the same weights too."""
    log_w = after.log_weight                                                   # [B, G]
    b, g = log_w.shape
    value, phi_f = _snis_mean(log_w, after.value, normalization)
    length, phi_l = _snis_mean(log_w, after.length, normalization)
    h_after = value / length
    phi = (phi_f - h_after * phi_l) / length           # influence of the ratio, [B, G]
    h_before, _ = entropy_before(before)
    # delta method: ΔH ≈ mean(φ) − mean(ψ), the linearized ratios after and before
    psi = (before.value - h_before * before.length) / before.length.mean()
    se = _stratified_se(phi - psi)
    wf = torch.exp(log_w - log_w.max()).reshape(-1)
    ess = float(wf.sum() ** 2 / (wf * wf).sum())
    k = psis_k(log_w.reshape(-1)) if psis else None
    reward = None if rewards is None else reward_change(log_w, rewards, normalization)
    return SnisEstimate(h_after=h_after, delta_h=h_after - h_before, se=se, ess=ess,
                        ess_fraction=ess / (b * g), psis_k=k, reward=reward,
                        influence=phi - psi)


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


def per_prompt_change(before: EntropySample, after: EntropySample) -> torch.Tensor:
    """Each prompt's own realized ΔH_n by SNIS within the prompt, float64 [B]."""
    w = torch.exp(after.log_weight - after.log_weight.max(dim=1, keepdim=True).values)
    return (w * after.value).sum(1) / (w * after.length).sum(1) - per_prompt_entropy(before)
