"""ProbeResult: the JSON a finished probe returns. Undefined statistics are null, never NaN."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UStatistic(_Out):
    value: float = Field(description="Cross-unit U-statistic of X_u·(D⊙Y_w), u≠w.")
    bars_dot: float = Field(description="X̄·(D⊙Ȳ), the plug-in (biased) product.")
    diag_sum: float = Field(description="Σ_u X_u·(D⊙Y_u), the same-unit terms removed.")
    se_plugin: float | None = None
    zeta1_plugin: float | None = None
    se_jackknife: float | None = None
    zeta1_jackknife: float | None = None


class ValueSE(_Out):
    value: float
    se: float | None


class DeltaH1(_Out):
    total: float
    se: float | None = Field(description="Delete-one jackknife SE of total (null if units < 3).")
    gradient_term: float
    momentum_term: float
    weight_decay_term: float
    mode: str
    units: int
    target: Literal["fresh_prompts", "held_out"] = Field(
        "fresh_prompts", description="What total estimates. fresh_prompts (single batch): the "
        "change on new prompts drawn like the batch's (the U-statistic drops each prompt's "
        "effect on itself). held_out (two_batch): the change on the entropy_batch prompts.")
    se_unconditional: float | None = Field(
        None, description="two_batch: se plus the main batch's sampling spread of Δθ (delta "
        "method, D and κ held fixed); se alone is conditional on the step taken.")
    u_statistic: UStatistic | None = Field(
        None, description="The cross-unit U-statistic (null in two_batch mode, which needs "
        "none: the E batch is independent of the step).")
    entropy_bonus_term: float = Field(0.0, description="The part of δH₁ from the entropy "
                                      "bonus in the step (objective.entropy_coef); "
                                      "gradient_term excludes it.")
    entropy_coef_for_target: ValueSE | None = Field(
        None, description="With objective.target_delta_h: the entropy_coef at which δH₁ "
        "equals the target (D and κ of this step held fixed); null when the slope is not clear "
        "of zero by one SE.")


class DeltaJ1(_Out):
    total: float = Field(description="∇J·Δθ, J the U batch's mean reward (leave-one-out "
                         "baselines, cross-unit U-statistic against Δθ).")
    se: float | None = Field(description="Delete-one jackknife SE (null if units < 3).")
    gradient_term: float
    momentum_term: float
    weight_decay_term: float
    entropy_bonus_term: float = 0.0
    informative_units: int = Field(description="Units with a non-constant reward.")
    se_reliable: bool = Field(description="False when fewer than 4 units carry reward signal "
                              "(sparse rewards): the SE then understates the spread.")


class Curvature(_Out):
    value: float = Field(description="delta_h − lr_multiplier·delta_h1.total: where first "
                         "order stops holding.")
    se: float | None = Field(description="Paired per unit on the same responses, so it is "
                             "small even where each term's SE is not.")


class EntropyBatchSummary(_Out):
    num_prompts: int
    responses_per_prompt: int
    mean_response_tokens: float


class RealizedRow(_Out):
    lr_multiplier: float
    delta_h: float
    se: float | None
    delta_h1: float = Field(description="lr_multiplier × delta_h1.total (first order is linear).")
    ess_fraction: float
    psis_k: float | None
    delta_j: float | None = Field(None, description="J(θ + sΔθ) − J(θ), the mean reward's "
                                  "change by SNIS on the same responses (rewards fixed).")
    delta_j_se: float | None = None
    curvature: Curvature | None = None


class Realized(_Out):
    delta_h: float
    se: float | None
    h_before: float
    h_before_se: float | None
    h_after: float
    ess: float
    ess_fraction: float
    psis_k: float | None
    low_ess: bool
    normalization: str
    delta_j: float | None = Field(None, description="J(θ⁺) − J(θ) of the real step: Σŵ·R − "
                                  "mean R on the same responses, rewards fixed per response.")
    delta_j_se: float | None = Field(None, description="Delta-method SE of delta_j.")
    log_weight_noise_floor: float | None = Field(
        None, description="max |S − S'| when S is recomputed with another chunking: log-weights "
        "(and |ΔH| per unit of log-weight) below this are numerical noise.")
    by_lr_multiplier: list[RealizedRow]
    target: Literal["batch_in_sample", "held_out"] = Field(
        "batch_in_sample", description="batch_in_sample (single batch): SNIS on the batch's "
        "own prompts and the very responses that built Δθ, which adds each prompt's effect "
        "on itself and a same-response term (O(1/B)) to the fresh-prompt change; held_out "
        "(two_batch): on the entropy_batch prompts, the same thing delta_h1 measures.")


class BatchSummary(_Out):
    num_prompts: int
    responses_per_prompt: int
    mean_response_tokens: float
    reward_mean: float
    zero_advantage_prompts: int
    on_policy_z: float | None = Field(
        None, description="z of the mean of log π(response) + its full-vocabulary entropy over "
        "the responses: about N(0, 1) when they are samples of this checkpoint's policy at this "
        "temperature; |z| > 5 on client rollouts adds a warning (null with the sampled entropy "
        "estimator and in two-batch mode, whose main batch has no full-vocabulary entropy).")


class Proxies(_Out):
    cov_logp_advantage: float = Field(
        description="Cui et al. 2025: mean over prompts of Cov_g(S, A) (sequence level).")
    cov_logp_advantage_se: float | None
    predicted_delta_h: float = Field(
        description="−lr·cov_logp_advantage: the proxy's entropy-change prediction under "
        "natural policy gradient with step lr (tabular softmax, no AdamW).")


class OptimizerSummary(_Out):
    lr: float
    betas: list[float]
    eps: float
    weight_decay: float
    step: int
    grad_norm: float
    clip_factor: float
    param_groups: int = 1


class Passes(_Out):
    forward_no_grad: int
    forward_grad: int
    backward: int
    noise_check_forward: int = 0


class Timing(_Out):
    load: float
    rollouts: float
    teacher_forcing: float
    gradients: float
    step: float
    realized: float
    total: float


class TracePoint(_Out):
    phase: str
    t: float
    device_allocated_bytes: int | None
    device_peak_bytes: int | None
    device_reserved_bytes: int | None
    host_rss_bytes: int


class Memory(_Out):
    peak_device_bytes: int | None
    peak_host_rss_bytes: int
    trace: list[TracePoint]


class Environment(_Out):
    device: str = Field(description="Rank 0's device when several workers ran the job.")
    torch: str
    transformers: str
    peft: str
    entropy_probe: str
    workers: int = Field(1, description="How many workers ran the job (request `workers`).")


class EntropyKind(_Out):
    normalization: str = Field(description="token_mean (nats per token) or sequence (nats per "
                               "response): the unit of h_before, h_after, delta_h, delta_h1.")
    estimator: str = Field(description="full_vocabulary or sampled.")
    temperature: float


class PromptRow(_Out):
    index: int = Field(description="The prompt's position in the batch.")
    unit: int = Field(description="Its unit (itself in exact mode, its block in blocks mode).")
    h_before: float | None = Field(description="Its own entropy estimate Ĥ_n(θ).")
    delta_h1: float = Field(description="Its unit's contribution to delta_h1 (their mean over "
                            "units is delta_h1.total).")
    delta_h: float | None = Field(description="Its own realized ΔH_n (SNIS within the prompt, "
                                  "the real step).")


class CheckpointEcho(_Out):
    base_model: str | None = Field(description="As requested (null: the adapter config's base).")
    adapter: str | None


class ProbeResult(_Out):
    delta_h1: DeltaH1
    entropy_batch: EntropyBatchSummary | None = Field(
        None, description="The held-out batch of two-batch mode (null in single-batch mode).")
    delta_j1: DeltaJ1 | None = None
    exchange_rate: ValueSE | None = Field(
        None, description="δH₁/δJ₁ (delta method): entropy spent per unit of mean reward "
        "gained; null unless δJ₁ is at least one SE from zero.")
    entropy: EntropyKind | None = None
    realized: Realized | None
    batch: BatchSummary
    proxies: Proxies
    optimizer: OptimizerSummary
    passes: Passes
    timing: Timing
    memory: Memory
    environment: Environment
    updated_adapter: str | None = None
    warnings: list[str] = Field(default_factory=list)
    per_prompt: list[PromptRow] | None = Field(None, description="With report.per_prompt.")
    checkpoint: CheckpointEcho | None = Field(
        None, description="The checkpoint paths probed; /ui and `report` group the jobs of one "
        "run by the adapter's parent directory.")
    checkpoint_step: int | None = Field(
        None, description="Global step of a TRL / HF Trainer `checkpoint-N` folder (its "
        "trainer_state.json, else the folder name); null for other checkpoints.")
