"""ProbeRequest: what a training loop sends to POST /probes (and `entropy-probe run --request`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator

MAX_NEW_TOKENS_LIMIT = 8192
MAX_SEQUENCES = 65536
MAX_PATH_CHARS = 4096
MAX_TOKEN_ID = 2**31 - 1
MAX_ABS_REWARD = 1e6
MAX_TIMEOUT_S = 30 * 86400   # 30 days: beyond this a deadline is a typo, not a plan
MAX_ENTROPY_COEF = 1e3
MIN_TEMPERATURE = 1e-3       # logits / τ must stay finite in float32 and bfloat16
MAX_WORKERS = 64             # per job; the server's pool size is the real bound (a 422)


class _Strict(BaseModel):
    # Unknown fields are typos; NaN/inf (JSON `NaN`, `Infinity`, "nan", 1e999) are never meant.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_nul(path: str) -> str:
    if "\x00" in path:
        raise ValueError("a path cannot contain a NUL character")
    return path


CheckpointPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS),
                           AfterValidator(_no_nul)]
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_TOKEN_ID)]


def printable(text: str) -> str:
    """`text` with characters UTF-8 cannot encode (lone surrogates) written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _lone_surrogate(data: Any) -> str | None:
    """Where the first string with a lone UTF-16 surrogate (JSON "\\ud800") is, else None.
    Such text cannot be encoded as UTF-8, so it cannot be stored or tokenized."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:                              # iterative: nesting depth is the client's choice
        loc, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return loc or "the body"
        elif isinstance(value, dict):
            todo += [(f"{loc}.{printable(str(k))}".lstrip("."), x)
                     for k, v in value.items() for x in (k, v)]
        elif isinstance(value, (list, tuple)):
            todo += [(f"{loc}[{i}]", v) for i, v in enumerate(value)]
    return None


class CheckpointSpec(_Strict):
    base_model: CheckpointPath | None = Field(
        None, description="HF model directory. Default: the adapter config's "
        "base_model_name_or_path when that is a local directory.")
    adapter: CheckpointPath | None = Field(
        None, description="PEFT adapter directory, or a TRL/Trainer checkpoint-N folder.")
    optimizer: CheckpointPath | None = Field(
        None, description="torch.save'd AdamW state_dict. Default: <adapter>/optimizer.pt.")
    allow_full_model: bool = Field(
        False, description="Allow probing without an adapter beyond max_trainable_params.")

    @model_validator(mode="after")
    def _need_something(self) -> CheckpointSpec:
        if self.base_model is None and self.adapter is None:
            raise ValueError("give checkpoint.adapter, checkpoint.base_model, or both")
        return self


class Rollout(_Strict):
    prompt: str = Field(min_length=1)
    responses: list[str | list[TokenId]] = Field(
        min_length=2, description="G ≥ 2 responses: text, or token ids (non-negative).")
    rewards: list[Annotated[float, Field(ge=-MAX_ABS_REWARD, le=MAX_ABS_REWARD)]] = Field(
        description="One reward per response, |r| ≤ 1e6 (larger ones overflow float32 "
        "gradients: rescale them).")

    @model_validator(mode="after")
    def _rewards_match(self) -> Rollout:
        if len(self.rewards) != len(self.responses):
            raise ValueError(f"rewards has {len(self.rewards)} entries but responses has "
                             f"{len(self.responses)}; give one reward per response")
        for j, r in enumerate(self.responses):
            if len(r) == 0:
                raise ValueError(f"responses[{j}] is empty; every response needs at least "
                                 "one token")
        return self


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOKEN_ID, description="0 disables top-k.")
    batch_size: int = Field(16, ge=1, le=4096,
                            description="Sequences per generate() call (bounds KV-cache memory).")


class RewardSpec(_Strict):
    kind: Literal["exact_match", "math_answer", "provided"] = "exact_match"


class ObjectiveSpec(_Strict):
    advantage: Literal["mean_centered", "standardized", "batch_standardized"] = Field(
        "mean_centered", description="R − mean_g R; divided by (std_g R + ε) for "
        "`standardized` (TRL scale_rewards='group'), by (std of all rewards + ε) for "
        "`batch_standardized` (TRL scale_rewards='batch'). Unbiased stds.")
    advantage_eps: float | None = Field(
        None, gt=0.0, le=1.0, description="ε of the standardized advantages. Default 1e-6 for "
        "`standardized` (verl's), 1e-4 for `batch_standardized` (TRL's); TRL uses 1e-4 for both.")
    length_norm: Literal["constant", "group_max", "per_sequence", "token_mean"] = Field(
        "constant", description="ℓ in the weight A/(G·ℓ): a constant C (Dr. GRPO), the group's "
        "longest response, the response's own length (GRPO), or `token_mean`: each weight is "
        "A/T_tot, T_tot the batch's response tokens (DAPO; TRL loss_type='dapo').")
    length_norm_constant: float | None = Field(
        None, ge=1e-3, description="C for length_norm=constant; default max_new_tokens "
        "(or the longest response for client rollouts).")
    entropy_coef: float = Field(
        0.0, ge=-MAX_ENTROPY_COEF, le=MAX_ENTROPY_COEF, description="TRL's entropy_coef: the "
        "step's loss is L − c·H_tok, H_tok the batch's token-mean full-vocabulary entropy "
        "differentiated through the logits (one more backward when ≠ 0).")
    target_delta_h: float | None = Field(
        None, ge=-1e6, le=1e6, description="Report delta_h1.entropy_coef_for_target: the "
        "entropy_coef at which δH₁ (first order, this step's D and κ) equals this value.")


class EstimatorSpec(_Strict):
    mode: Literal["exact", "blocks"] = "exact"
    block_size: int = Field(4, ge=1, le=4096)


class EntropySpec(_Strict):
    normalization: Literal["token_mean", "sequence"] = Field(
        "token_mean", description="token_mean: E[Σ_t h_t]/E[T], what TRL's `entropy` and "
        "verl's `actor/entropy` log; sequence: nats per response, E[Σ_t h_t].")
    estimator: Literal["full_vocabulary", "sampled"] = Field(
        "full_vocabulary", description="full_vocabulary: h_t is the entropy of the whole "
        "next-token distribution (lower variance); sampled: −log π of the sampled token.")


class ReportSpec(_Strict):
    per_prompt: bool = Field(False, description="Add per prompt: h_before, its δH₁ "
                             "contribution (its unit's row) and its realized ΔH.")


class EntropyBatch(_Strict):
    """Two-batch mode: held-out prompts on which the entropy, δH₁ and the realized ΔH are
    measured, under the step the main batch (prompts/answers or rollouts) takes."""

    prompts: list[str] = Field(min_length=2, max_length=MAX_SEQUENCES, description="Held-out "
                               "prompts; responses are sampled from the checkpoint's policy.")
    responses_per_prompt: int = Field(1, ge=1, le=1024, description="G_E (1: each prompt's "
                                      "baseline is the other prompts' responses).")
    num_prompts: int | None = Field(None, ge=2, le=MAX_SEQUENCES,
                                    description="Use only the first num_prompts prompts.")

    @model_validator(mode="after")
    def _usable(self) -> EntropyBatch:
        if any(not p for p in self.prompts):
            raise ValueError("entropy_batch.prompts must be non-empty strings")
        if self.num_prompts is not None and self.num_prompts > len(self.prompts):
            raise ValueError(f"entropy_batch.num_prompts={self.num_prompts} but only "
                             f"{len(self.prompts)} prompts were given")
        n = self.num_prompts or len(self.prompts)
        if n * self.responses_per_prompt > MAX_SEQUENCES:
            raise ValueError(f"entropy_batch: {n}x{self.responses_per_prompt} sequences "
                             f"exceeds the limit of {MAX_SEQUENCES}")
        return self


class OptimizerOverrides(_Strict):
    lr: float | None = Field(None, ge=0.0, le=10.0)
    max_grad_norm: float | None = Field(None, gt=0.0)


class RealizedSpec(_Strict):
    enabled: bool = True
    normalization: Literal["global", "per_prompt"] = "global"
    psis: bool = True
    ess_threshold: float = Field(0.5, ge=0.0, le=1.0)
    lr_multipliers: list[float] = Field(default_factory=lambda: [1.0], min_length=1,
                                        max_length=16)

    @model_validator(mode="after")
    def _finite_multipliers(self) -> RealizedSpec:
        for s in self.lr_multipliers:
            if not (-1e3 <= s <= 1e3):
                raise ValueError("lr_multipliers must lie in [-1000, 1000]")
        return self


class MemorySpec(_Strict):
    teacher_force_microbatch_size: int = Field(2, ge=1, le=4096)
    trace: bool = True
    host_budget_bytes: int | None = Field(
        None, ge=0, le=2**62, description="Host memory for per-unit gradient vectors; above it "
        "a second gradient pass recomputes them. Default: the server's setting.")


class ProbeRequest(_Strict):
    checkpoint: CheckpointSpec
    prompts: list[str] | None = None
    answers: list[str] | None = None
    prompt_format: Literal["raw", "chat"] = "raw"
    rollouts: list[Rollout] | None = None
    num_prompts: int | None = Field(None, ge=1, le=MAX_SEQUENCES,
                                    description="Use only the first num_prompts prompts.")
    responses_per_prompt: int = Field(4, ge=2, le=1024)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    reward: RewardSpec = Field(default_factory=RewardSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    estimator: EstimatorSpec = Field(default_factory=EstimatorSpec)
    entropy: EntropySpec = Field(default_factory=EntropySpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    entropy_batch: EntropyBatch | None = Field(
        None, description="Two-batch mode: the step from the main batch, the entropy and its "
        "change (δH₁, realized ΔH) on these held-out prompts; delta_h1.mode = two_batch.")
    optimizer_overrides: OptimizerOverrides = Field(default_factory=OptimizerOverrides)
    realized: RealizedSpec = Field(default_factory=RealizedSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="Sampling seed. Each generate() call (of "
        "generation.batch_size // G prompts) is seeded from (seed, its index), so the responses "
        "depend on the seed, the prompts and generation.batch_size, not on `workers`.")
    save_updated_adapter_to: CheckpointPath | None = None
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, description="Deadline in seconds from the moment a worker "
        "starts the job (queue time does not count); past it the job stops at the next chunk "
        "boundary and fails with deadline_exceeded. Default and ceiling: the server's "
        "ENTROPY_PROBE_MAX_JOB_SECONDS (unset: no deadline).")
    workers: int = Field(
        1, ge=1, le=MAX_WORKERS, description="Shard the job's units over this many workers of "
        "the server's pool (at most its size, else a 422). Responses and numbers do not depend "
        "on it (float tolerance). The job waits until that many workers are idle, and jobs "
        "queued after it wait behind it. `entropy-probe run` (one process) ignores it.")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = _lone_surrogate(data)
        if where is not None:
            raise ValueError(f"{where}: text must be valid Unicode (it has a lone surrogate "
                             "such as \\ud800)")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProbeRequest:
        if self.rollouts is not None:
            if self.prompts is not None or self.answers is not None:
                raise ValueError("give either rollouts or prompts/answers, not both")
            if self.reward.kind != "provided":
                raise ValueError("rollouts carry their own rewards: set reward.kind to "
                                 "'provided'")
            sizes = {len(r.responses) for r in self.rollouts}
            if len(sizes) != 1:
                raise ValueError("every rollout needs the same number of responses "
                                 f"(got {sorted(sizes)})")
            n_prompts = len(self.rollouts)
        else:
            if not self.prompts:
                raise ValueError("give prompts (with answers) or rollouts")
            if any(not p for p in self.prompts):
                raise ValueError("prompts must be non-empty strings")
            if self.answers is not None and any(not a.strip() for a in self.answers):
                raise ValueError("answers must be non-empty: each is the reference answer its "
                                 "prompt's responses are scored against")
            if self.reward.kind == "provided":
                raise ValueError("reward.kind 'provided' needs rollouts with rewards")
            if self.answers is None or len(self.answers) != len(self.prompts):
                got = None if self.answers is None else len(self.answers)
                raise ValueError(f"answers must have one entry per prompt "
                                 f"({len(self.prompts)} prompts, {got} answers)")
            n_prompts = len(self.prompts)
        if self.num_prompts is not None:
            if self.num_prompts > n_prompts:
                raise ValueError(f"num_prompts={self.num_prompts} but only {n_prompts} "
                                 "prompts were given")
            n_prompts = self.num_prompts
        if self.estimator.mode == "blocks" and n_prompts % self.estimator.block_size:
            raise ValueError(f"estimator.block_size={self.estimator.block_size} must divide "
                             f"the number of prompts ({n_prompts})")
        if (self.entropy_batch is not None and self.entropy_batch.responses_per_prompt == 1
                and self.realized.normalization == "per_prompt"):
            raise ValueError("realized.normalization 'per_prompt' needs entropy_batch."
                             "responses_per_prompt >= 2 (one response per prompt has no "
                             "within-prompt weights to normalize)")
        g = self.group_size()
        if n_prompts * g > MAX_SEQUENCES:
            raise ValueError(f"{n_prompts}x{g} sequences exceeds the limit of {MAX_SEQUENCES}")
        return self

    def group_size(self) -> int:
        """G: responses per prompt (from the rollouts when they are given)."""
        if self.rollouts:
            return len(self.rollouts[0].responses)
        return self.responses_per_prompt
