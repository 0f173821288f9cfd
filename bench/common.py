"""Shared pieces of the benchmarks: a 32k-vocabulary checkpoint and a random client batch.

Run the benchmarks from the repository root: `python -m bench.cost`, `python -m bench.memory`.
"""

from __future__ import annotations

import argparse
import os
import random

from probe_core.spec import (CheckpointSpec, ClientRollout, GenerationSpec, ProbeSpec,
                             RealizedSpec)
from probe_core.tiny import TinyConfig, build_tokenizer, write_tiny_checkpoint

CACHE = os.environ.get("ENTROPY_PROBE_BENCH_DIR", "/tmp/entropy-probe-bench")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options of the benchmark model and batch shared by cost.py and memory.py."""
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--microbatch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's "
                    "default)")


def checkpoint(hidden: int = 256, layers: int = 4, rank: int = 8, vocab: int = 32000,
               root: str = CACHE) -> tuple[str, str]:
    """A tiny-architecture Llama base with a `vocab`-token vocabulary and a LoRA adapter on all
    projections with a real AdamW state; written once per shape and reused."""
    out = os.path.join(root, f"h{hidden}-l{layers}-r{rank}-v{vocab}")
    base, adapter = os.path.join(out, "base"), os.path.join(out, "adapter")
    if not os.path.isfile(os.path.join(adapter, "optimizer.pt")):
        write_tiny_checkpoint(out, TinyConfig(vocab_size=vocab, hidden_size=hidden,
                                              layers=layers, heads=max(1, hidden // 64),
                                              lora_rank=rank, train_steps=2))
    return base, adapter


def client_rollouts(num_prompts: int, group: int, max_new_tokens: int, vocab: int,
                    seed: int = 0, eos_id: int | None = None) -> list[ClientRollout]:
    """Random prompts, responses of random token ids with random lengths (those shorter than
    max_new_tokens end with EOS), random 0/1 rewards."""
    rng = random.Random(seed)
    if eos_id is None:
        eos_id = build_tokenizer(TinyConfig()).eos_token_id
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 +-="
    out = []
    for _ in range(num_prompts):
        prompt = "".join(rng.choice(letters) for _ in range(rng.randint(8, 24)))
        responses = []
        for _ in range(group):
            n = rng.randint(4, max_new_tokens)
            ids = [rng.randrange(2, vocab) for _ in range(n)]
            if n < max_new_tokens:
                ids[-1] = eos_id
            responses.append(ids)
        rewards = [float(rng.random() < 0.5) for _ in range(group)]
        out.append(ClientRollout(prompt, responses, rewards))
    return out


def probe_spec(base: str, adapter: str, num_prompts: int, group: int, max_new_tokens: int,
               vocab: int, microbatch: int = 2, seed: int = 0) -> ProbeSpec:
    return ProbeSpec(
        checkpoint=CheckpointSpec(base, adapter),
        rollouts=client_rollouts(num_prompts, group, max_new_tokens, vocab, seed),
        responses_per_prompt=group, reward_kind="provided",
        generation=GenerationSpec(max_new_tokens=max_new_tokens),
        realized=RealizedSpec(lr_multipliers=[1.0]), microbatch_size=microbatch, seed=seed)
