"""ProbeRequest: what a training loop sends to POST /probes (and `entropy-probe run --request`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_NEW_TOKENS_LIMIT = 8192
MAX_SEQUENCES = 65536


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointSpec(_Strict):
    base_model: str | None = Field(
        None, description="HF model directory. Default: the adapter config's "
        "base_model_name_or_path when that is a local directory.")
    adapter: str | None = Field(
        None, description="PEFT adapter directory, or a TRL/Trainer checkpoint-N folder.")
    optimizer: str | None = Field(
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
    responses: list[str | list[int]] = Field(min_length=2)
    rewards: list[float]

    @model_validator(mode="after")
    def _rewards_match(self) -> Rollout:
        if len(self.rewards) != len(self.responses):
            raise ValueError(f"rewards has {len(self.rewards)} entries but responses has "
                             f"{len(self.responses)}; give one reward per response")
        for r in self.responses:
            if isinstance(r, list) and any(t < 0 for t in r):
                raise ValueError("token ids must be non-negative")
        return self


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    batch_size: int = Field(16, ge=1, le=4096,
                            description="Sequences per generate() call (bounds KV-cache memory).")


class RewardSpec(_Strict):
    kind: Literal["exact_match", "math_answer", "provided"] = "exact_match"


class ObjectiveSpec(_Strict):
    advantage: Literal["mean_centered", "standardized"] = "mean_centered"
    length_norm: Literal["constant", "group_max", "per_sequence"] = "constant"
    length_norm_constant: float | None = Field(
        None, gt=0.0, description="C for length_norm=constant; default max_new_tokens "
        "(or the longest response for client rollouts).")


class EstimatorSpec(_Strict):
    mode: Literal["exact", "blocks"] = "exact"
    block_size: int = Field(4, ge=1, le=4096)


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
        None, ge=0, description="Host memory for per-unit gradient vectors; above it a second "
        "gradient pass recomputes them. Default: the server's setting.")


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
    optimizer_overrides: OptimizerOverrides = Field(default_factory=OptimizerOverrides)
    realized: RealizedSpec = Field(default_factory=RealizedSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    save_updated_adapter_to: str | None = None

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
        g = self.group_size()
        if n_prompts * g > MAX_SEQUENCES:
            raise ValueError(f"{n_prompts}x{g} sequences exceeds the limit of {MAX_SEQUENCES}")
        return self

    def group_size(self) -> int:
        """G: responses per prompt (from the rollouts when they are given)."""
        if self.rollouts:
            return len(self.rollouts[0].responses)
        return self.responses_per_prompt
