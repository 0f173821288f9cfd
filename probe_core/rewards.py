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


def advantages(rewards: torch.Tensor, kind: str) -> torch.Tensor:
    """A = R − mean_g R, or that divided by (std_g R + 1e-6) (unbiased std, as TRL).

    Args: rewards [B, G]. Returns [B, G] float64.
    """
    r = rewards.double()
    a = r - r.mean(dim=1, keepdim=True)                        # [B, G]
    if kind == "standardized":
        a = a / (r.std(dim=1, keepdim=True) + 1e-6)
    elif kind != "mean_centered":
        raise ValueError(f"unknown advantage kind {kind!r}")
    return a


def length_norm(lengths: torch.Tensor, kind: str, constant: float) -> torch.Tensor:
    """ℓ per sequence. Args: lengths [B, G]. Returns [B, G] float64."""
    lengths = lengths.double()
    if kind == "constant":
        return torch.full_like(lengths, float(constant))
    if kind == "group_max":
        return lengths.max(dim=1, keepdim=True).values.expand_as(lengths).clamp(min=1)
    if kind == "per_sequence":
        return lengths.clamp(min=1)
    raise ValueError(f"unknown length_norm {kind!r}")
