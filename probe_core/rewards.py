"""Rewards, group-relative advantages and length normalization (GRPO / Dr. GRPO conventions)."""

from __future__ import annotations

import re

import torch

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_final_number(text: str) -> float | None:
    """The final numeric answer: after the last GSM8K '####', else in the last \\boxed{...},
    else the last number in the text."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    else:
        boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
        if boxed:
            text = boxed[-1]
    found = _NUMBER.findall(text.replace("$", ""))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def score(kind: str, response: str, answer: str) -> float:
    """1.0 for a correct response, else 0.0."""
    if kind == "exact_match":
        return float(response.strip() == answer.strip())
    if kind == "math_answer":
        got, want = extract_final_number(response), extract_final_number(answer)
        return float(got is not None and want is not None and abs(got - want) <= 1e-6 *
                     max(1.0, abs(want)))
    raise ValueError(f"unknown reward kind {kind!r}")


# ε of the standardized advantages: this project's first-round convention for the per-group std
# (also verl's GRPO epsilon), TRL's for its whole-batch std (grpo_trainer: `std_rewards + 1e-4`).
GROUP_STD_EPS = 1e-6
TRL_STD_EPS = 1e-4


def advantages(rewards: torch.Tensor, kind: str, eps: float | None = None) -> torch.Tensor:
    """Group-relative advantages A = R − mean_g R, optionally scaled by a std.

    - `mean_centered`: A = R − mean_g R (Dr. GRPO; TRL scale_rewards="none").
    - `standardized`: A / (std_g R + ε), ε = 1e-6 by default (TRL scale_rewards="group" with
      ε = 1e-4).
    - `batch_standardized`: A / (std R + ε) with one std over all B·G rewards and ε = 1e-4 by
      default: TRL's scale_rewards="batch" (centred per group, scaled per batch).
    Every std is the unbiased one (Bessel-corrected), as TRL's `nanstd` and torch's `std`.

    Args: rewards [B, G]; eps: ε, None for the kind's default. Returns [B, G] float64.
    """
    r = rewards.double()
    a = r - r.mean(dim=1, keepdim=True)                        # [B, G]
    if kind == "standardized":
        a = a / (r.std(dim=1, keepdim=True) + (GROUP_STD_EPS if eps is None else eps))
    elif kind == "batch_standardized":
        a = a / (r.std() + (TRL_STD_EPS if eps is None else eps))
    elif kind != "mean_centered":
        raise ValueError(f"unknown advantage kind {kind!r}")
    return a


def length_norm(lengths: torch.Tensor, kind: str, constant: float) -> torch.Tensor:
    """ℓ per sequence, so that the update loss is L = −(1/B) Σ_n Σ_g A/(G ℓ) · S.

    `token_mean` makes each sequence's weight A/T_tot, T_tot the number of response tokens in
    the batch (DAPO; TRL loss_type="dapo"; verl loss_agg_mode="token-mean"): ℓ = T_tot/(B·G),
    the batch's mean response length, the same for every sequence. Like κ it is a batch scalar
    held fixed (not differentiated, not left out per unit) by the estimators.

    Args: lengths [B, G] (response tokens, EOS included). Returns [B, G] float64.
    """
    lengths = lengths.double()
    if kind == "constant":
        return torch.full_like(lengths, float(constant))
    if kind == "group_max":
        return lengths.max(dim=1, keepdim=True).values.expand_as(lengths).clamp(min=1)
    if kind == "per_sequence":
        return lengths.clamp(min=1)
    if kind == "token_mean":
        return torch.full_like(lengths, float(lengths.mean().clamp(min=1)))
    raise ValueError(f"unknown length_norm {kind!r}")
