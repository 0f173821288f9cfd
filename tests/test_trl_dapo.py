"""The probe's step is TRL's step (issue 15): a real GRPOTrainer run with loss_type="dapo"
(TRL's default) writes checkpoint-N folders; the batch TRL trained step N+1 on (its prompts,
completion token ids and rewards, recorded by the reward function) is sent to the probe as
`rollouts` against checkpoint-N with the objective the trainer used, and the probe's
save_updated_adapter_to must equal TRL's own checkpoint-(N+1) adapter.

TRL's step is exactly one AdamW step on that batch here because num_iterations = 1 (the
importance ratio is exp(lp − sg(lp)) = 1 and its clipping is inactive), β = 0 (no KL term),
steps_per_generation = gradient_accumulation_steps = 1 (one batch, one micro-batch, one
optimizer step per generation), and the prompts have equal token lengths (no left padding, so
TRL's forward without position ids sees the same positions as the probe's).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from probe_core.probe import run_probe  # noqa: E402
from probe_core.spec import (CheckpointSpec, ClientRollout, GenerationSpec,  # noqa: E402
                             ObjectiveSpec, ProbeSpec, RealizedSpec)
from probe_core.tiny import TinyConfig, build_tokenizer, write_tiny_base  # noqa: E402

PROMPTS = ["1+2=", "3+1=", "2+2=", "0+4=", "4-1=", "2*2="]   # equal token lengths
G = 4
MAX_STEPS = 3
LR = 1e-2
TEMPERATURE = 0.7
MAX_GRAD_NORM = 0.05       # small enough that TRL clips: κ < 1 is part of the check


class RecordingReward:
    """A TRL reward function that scores completions and records what it saw, per step."""

    __name__ = "recording_reward"

    def __init__(self):
        self.batches: dict[int, tuple[list[str], list[list[int]], list[float]]] = {}

    def __call__(self, prompts, completions, completion_ids, trainer_state, **kwargs):
        rewards = [float(c.strip().startswith("4")) + 0.1 * len(c) for c in completions]
        # TRL holds rewards in float32: record what its advantages are computed from
        rewards32 = torch.tensor(rewards, dtype=torch.float32).tolist()
        self.batches[trainer_state.global_step] = (list(prompts),
                                                   [list(c) for c in completion_ids], rewards32)
        return rewards


@pytest.fixture(scope="module", params=[0.0, 0.2], ids=["no_bonus", "entropy_coef"])
def run(request, tmp_path_factory):
    """A GRPOTrainer run; with entropy_coef, TRL's loss has its entropy bonus."""
    root = str(tmp_path_factory.mktemp("trl_dapo"))
    base = os.path.join(root, "base")
    write_tiny_base(base)
    reward = RecordingReward()
    args = GRPOConfig(
        output_dir=os.path.join(root, "run"), max_steps=MAX_STEPS, save_steps=1,
        learning_rate=LR, lr_scheduler_type="linear", weight_decay=0.01,
        per_device_train_batch_size=len(PROMPTS) * G // 2, num_generations=G,
        max_completion_length=8, temperature=TEMPERATURE, max_grad_norm=MAX_GRAD_NORM,
        loss_type="dapo", scale_rewards="group", beta=0.0, num_iterations=1,
        entropy_coef=request.param, logging_steps=1, report_to=[], use_cpu=True, bf16=False,
        fp16=False, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=base, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                          processing_class=build_tokenizer(TinyConfig()), peft_config=lora)
    assert trainer.args.steps_per_generation == trainer.args.gradient_accumulation_steps == 1
    trainer.train()
    return root, base, args.output_dir, reward, request.param


def _rollouts(batch) -> list[ClientRollout]:
    """TRL's batch (each prompt repeated G times in a row) as the probe's rollouts."""
    prompts, completions, rewards = batch
    out = []
    for k in range(0, len(prompts), G):
        assert len(set(prompts[k:k + G])) == 1
        out.append(ClientRollout(prompts[k], completions[k:k + G], rewards[k:k + G]))
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_probe_step_is_trls_next_checkpoint(run, tmp_path, n):
    root, base, out_dir, reward, entropy_coef = run
    ckpt, nxt = (os.path.join(out_dir, f"checkpoint-{k}") for k in (n, n + 1))
    rollouts = _rollouts(reward.batches[n])
    saved = str(tmp_path / "probe_step")
    spec = ProbeSpec(
        checkpoint=CheckpointSpec(base, ckpt), rollouts=rollouts, reward_kind="provided",
        responses_per_prompt=G,
        generation=GenerationSpec(max_new_tokens=8, temperature=TEMPERATURE),
        objective=ObjectiveSpec(advantage="standardized", advantage_eps=1e-4,
                                length_norm="token_mean", entropy_coef=entropy_coef),
        max_grad_norm=MAX_GRAD_NORM, realized=RealizedSpec(enabled=False),
        save_updated_adapter_to=saved)
    out = run_probe(spec)
    assert out.optimizer.clip_factor < 1.0              # TRL clipped this step, and so did we
    before = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(nxt, "adapter_model.safetensors"))
    ours = load_file(os.path.join(saved, "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    step_theirs = torch.cat([(theirs[k] - before[k]).reshape(-1).double() for k in sorted(theirs)])
    step_ours = torch.cat([(ours[k] - before[k]).reshape(-1).double() for k in sorted(theirs)])
    scale = float(step_theirs.abs().max())         # ≈ lr: AdamW steps are lr-sized
    assert scale > 0
    # θ⁺ to rtol 1e-4; atol 1e-4 of the largest step element, for parameters near zero
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4 * scale,
                                   msg=lambda m, key=key: f"{key}: {m}")
    # the step itself, not only θ + Δθ: Δθ agrees to 1e-4 of its own scale
    torch.testing.assert_close(step_ours, step_theirs, rtol=1e-4, atol=1e-4 * scale)
    print(f"\ncheckpoint-{n}→{n + 1}: max |Δθ_probe − Δθ_TRL| / max |Δθ_TRL| = "
          f"{float((step_ours - step_theirs).abs().max()) / scale:.2e}, κ = "
          f"{out.optimizer.clip_factor:.4f}, lr = {out.optimizer.lr:.4g}")
