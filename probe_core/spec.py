"""What a probe is asked to do, as plain dataclasses (the service maps ProbeRequest onto these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

Phase = Literal["load", "rollouts", "teacher_forcing", "gradients", "step", "realized"]
PHASES: tuple[Phase, ...] = get_args(Phase)
PromptFormat = Literal["raw", "chat"]
RewardKind = Literal["exact_match", "math_answer", "provided"]
AdvantageKind = Literal["mean_centered", "standardized", "batch_standardized"]
LengthNorm = Literal["constant", "group_max", "per_sequence", "token_mean"]
EstimatorMode = Literal["exact", "blocks"]
RealizedNormalization = Literal["global", "per_prompt"]
GradMethod = Literal["auto", "hooks", "two_backward"]
EntropyNormalization = Literal["token_mean", "sequence"]
EntropyEstimator = Literal["full_vocabulary", "sampled"]

DEFAULT_HOST_BUDGET_BYTES = 8 << 30          # unit vectors kept on the host up to this
DEFAULT_MAX_TRAINABLE_PARAMS = 50_000_000    # above it a probe needs allow_full_model


@dataclass
class CheckpointSpec:
    base_model: str | None
    adapter: str | None
    optimizer: str | None = None
    allow_full_model: bool = False


@dataclass
class ClientRollout:
    prompt: str
    responses: list[str | list[int]]
    rewards: list[float]


@dataclass
class GenerationSpec:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16


@dataclass
class ObjectiveSpec:
    advantage: AdvantageKind = "mean_centered"
    length_norm: LengthNorm = "constant"
    length_norm_constant: float | None = None
    advantage_eps: float | None = None      # None: the kind's default (rewards.advantages)
    entropy_coef: float = 0.0               # TRL's bonus: the step's loss is L − c·H_tok
    target_delta_h: float | None = None     # ask for the entropy_coef giving this δH₁

    @property
    def needs_bonus_gradient(self) -> bool:
        return self.entropy_coef != 0.0 or self.target_delta_h is not None


@dataclass
class EstimatorSpec:
    mode: EstimatorMode = "exact"
    block_size: int = 4


@dataclass
class EntropyBatchSpec:
    """Two-batch mode (issue 14): held-out E prompts whose entropy, δH₁ and realized ΔH are
    measured under the step the main (U) batch takes. G_E responses each are sampled from the
    checkpoint's policy with the request's generation settings."""

    prompts: list[str]
    responses_per_prompt: int = 1
    num_prompts: int | None = None


@dataclass
class EntropySpec:
    """Which entropy (probe_core/entropy.py): token_mean or per-sequence, full-vocabulary or
    sampled. The first round's quantity is sequence + sampled."""

    normalization: EntropyNormalization = "token_mean"
    estimator: EntropyEstimator = "full_vocabulary"


@dataclass
class ReportSpec:
    per_prompt: bool = False                # per prompt: h_before, its δH₁ part, its ΔH


@dataclass
class RealizedSpec:
    enabled: bool = True
    normalization: RealizedNormalization = "global"
    psis: bool = True
    ess_threshold: float = 0.5
    lr_multipliers: list[float] = field(default_factory=lambda: [1.0])


@dataclass
class ProbeSpec:
    checkpoint: CheckpointSpec
    prompts: list[str] | None = None
    answers: list[str] | None = None
    prompt_format: PromptFormat = "raw"
    rollouts: list[ClientRollout] | None = None
    num_prompts: int | None = None
    responses_per_prompt: int = 4
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    reward_kind: RewardKind = "exact_match"
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    estimator: EstimatorSpec = field(default_factory=EstimatorSpec)
    entropy: EntropySpec = field(default_factory=EntropySpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    lr_override: float | None = None
    max_grad_norm: float | None = None
    realized: RealizedSpec = field(default_factory=RealizedSpec)
    microbatch_size: int = 2
    trace_memory: bool = True
    host_budget_bytes: int = DEFAULT_HOST_BUDGET_BYTES
    seed: int = 0
    save_updated_adapter_to: str | None = None
    entropy_batch: EntropyBatchSpec | None = None


@dataclass
class RuntimeOptions:
    """Server-side settings that are not part of a request."""

    device: str = "auto"                    # auto | cpu | cuda:N
    checkpoint_roots: list[str] | None = None  # None: any path is allowed (library use)
    trust_remote_code: bool = False
    max_trainable_params: int = DEFAULT_MAX_TRAINABLE_PARAMS
    autocast_dtype: str | None = "auto"      # auto: bf16 on CUDA when supported, else none
    grad_method: GradMethod = "auto"
