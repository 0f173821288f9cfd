"""What a probe returns, as plain dataclasses (service/mapping.py turns it into ProbeResult)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from probe_core.adamw import AdamWStep
from probe_core.entropy import SequenceStats
from probe_core.estimators import DeltaH1
from probe_core.proxy import CovarianceProxy
from probe_core.reward_side import RewardOutcome
from probe_core.importance import SnisEstimate
from probe_core.memory import MemoryTracer


@dataclass
class RealizedOutcome:
    h_before: float
    h_before_se: float | None
    normalization: str
    ess_threshold: float
    by_multiplier: list[tuple[float, SnisEstimate]]   # (s, estimate), in request order
    noise_floor: float | None
    target: str = "batch_in_sample"    # "held_out" in two-batch mode
    per_prompt_h_before: torch.Tensor | None = None    # Ĥ_n(θ) [B] float64
    per_prompt_delta_h: torch.Tensor | None = None     # per-prompt SNIS ΔH_n at s = main [B]

    @property
    def main(self) -> tuple[float, SnisEstimate]:
        """The real step (s = 1), or the first multiplier when 1 was not asked for."""
        for s, est in self.by_multiplier:
            if s == 1.0:
                return s, est
        return self.by_multiplier[0]


@dataclass
class EntropyOutcome:
    """The entropy kind the numbers are in (echoed in the result)."""

    normalization: str
    estimator: str
    temperature: float


@dataclass
class PerPromptView:
    """Per prompt, [B] each: unit (its unit's index, long); delta_h1 (its unit's contribution,
    float64: their mean over units is δH₁); h_before, delta_h (its own Ĥ_n(θ) and per-prompt
    SNIS ΔH_n; None without the realized pass)."""

    unit: torch.Tensor
    delta_h1: torch.Tensor
    h_before: torch.Tensor | None
    delta_h: torch.Tensor | None


@dataclass
class BatchOutcome:
    num_prompts: int
    responses_per_prompt: int
    mean_response_tokens: float
    reward_mean: float
    zero_advantage_prompts: int
    on_policy_z: float | None = None    # entropy.on_policy_z; None without full-vocabulary f


@dataclass
class EntropyBatchOutcome:
    """The held-out E batch of two-batch mode."""

    num_prompts: int
    responses_per_prompt: int
    mean_response_tokens: float


@dataclass
class OptimizerOutcome:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    step: int
    grad_norm: float
    clip_factor: float
    param_groups: int


@dataclass
class Passes:
    forward_no_grad: int = 0
    forward_grad: int = 0
    backward: int = 0
    noise_check_forward: int = 0


@dataclass
class ProbeOutcome:
    delta_h1: DeltaH1
    mode: str
    units: int
    entropy: EntropyOutcome
    realized: RealizedOutcome | None
    batch: BatchOutcome
    proxy: CovarianceProxy
    proxy_lr: float
    optimizer: OptimizerOutcome
    passes: Passes
    timing: dict[str, float]      # phase name → seconds, plus "total"
    memory: MemoryTracer
    device: str
    updated_adapter: str | None
    grad_method: str
    base_reused: bool
    warnings: list[str] = field(default_factory=list)
    entropy_batch: EntropyBatchOutcome | None = None
    per_prompt: PerPromptView | None = None
    reward: RewardOutcome | None = None      # δJ₁, exchange rate, entropy bonus (issue 15)
    # for library users and tests (not in the JSON): the flat gradient summaries and the step
    step: AdamWStep | None = None
    x_bar: torch.Tensor | None = None     # [P] float64
    y_bar: torch.Tensor | None = None     # [P] float64
    unit_x: torch.Tensor | None = None    # [U, P] fp32, None when over the host budget
    unit_y: torch.Tensor | None = None
    sequences: SequenceStats | None = None   # S, T, f, b of every sequence (host, batch order)
