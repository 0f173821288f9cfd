"""Shared pieces of the benchmarks: the benchmark models and a random client batch.

Models (`--model`):
- `tiny32k` (default): a random Llama, hidden 256, 4 layers, a 32k vocabulary, LoRA r=8 on all
  projections;
- `qwen2.5-0.5b`: the real Qwen2.5-0.5B configuration (vocabulary 151,936, hidden 896,
  intermediate 4,864, 14 heads, 2 KV heads, tied embeddings) with its 24 layers cut to 4 for CPU
  time, random weights, LoRA r=16 on all linear layers (q,k,v,o,gate,up,down).
Each is written once under $ENTROPY_PROBE_BENCH_DIR (default /tmp/entropy-probe-bench).

Run the benchmarks from the repository root: `python -m bench.cost`, `python -m bench.memory`.
"""

from __future__ import annotations

import argparse
import os
import random

from dataclasses import dataclass

import torch

from probe_core.spec import (CheckpointSpec, ClientRollout, EntropySpec, GenerationSpec,
                             ProbeSpec, RealizedSpec)
from probe_core.tiny import LORA_TARGETS, TinyConfig, build_tokenizer, write_tiny_checkpoint

CACHE = os.environ.get("ENTROPY_PROBE_BENCH_DIR", "/tmp/entropy-probe-bench")


ESTIMATORS = ("sampled", "full_vocabulary")


@dataclass
class QwenShape:
    """A Qwen2 configuration (random weights) and its LoRA rank."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rank: int


# the real Qwen2.5-0.5B sizes, 24 layers cut to 4 for CPU time
QWEN_0_5B = QwenShape(896, 4, 14, 2, 4864, 151936, 16)
# per model: the defaults of --prompts, --tokens, --microbatch (the seed design's validation
# setup for Qwen: B=8 beside B=16, G=4, 64 new tokens, microbatch 1)
MODEL_DEFAULTS = {"tiny32k": ([32], 40, 2), "qwen2.5-0.5b": ([8, 16], 64, 1)}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options of the benchmark model and batch shared by cost.py and memory.py."""
    ap.add_argument("--model", choices=sorted(MODEL_DEFAULTS), default="tiny32k")
    ap.add_argument("--hidden", type=int, default=256, help="tiny32k only")
    ap.add_argument("--layers", type=int, default=4, help="tiny32k only")
    ap.add_argument("--rank", type=int, default=8, help="tiny32k only")
    ap.add_argument("--vocab", type=int, default=32000, help="tiny32k only")
    ap.add_argument("--tokens", type=int, default=None, help="max new tokens (per model)")
    ap.add_argument("--microbatch", type=int, default=None, help="sequences per chunk")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's "
                    "default)")


def resolve_model_args(args: argparse.Namespace, prompts_attr: str = "prompts"
                       ) -> tuple[str, str, str]:
    """Fill the per-model defaults into args and write (or reuse) the model. Returns the base,
    the adapter and a one-line description of the model."""
    prompts, tokens, microbatch = MODEL_DEFAULTS[args.model]
    if getattr(args, prompts_attr, None) is None:
        setattr(args, prompts_attr, prompts)
    args.tokens = args.tokens or tokens
    args.microbatch = args.microbatch or microbatch
    if args.model == "qwen2.5-0.5b":
        shape = QWEN_0_5B
        args.vocab = shape.vocab
        out = os.path.join(CACHE, "qwen2.5-0.5b-l4-r16")
        if not os.path.isfile(os.path.join(out, "adapter", "optimizer.pt")):
            qwen_checkpoint(shape, out, torch.device("cpu"))
        return (os.path.join(out, "base"), os.path.join(out, "adapter"),
                "Qwen2.5-0.5B configuration (vocab 151,936, hidden 896, intermediate 4,864, "
                "14/2 heads) with 4 of its 24 layers, random weights, LoRA r=16 on all linear "
                "layers")
    base, adapter = checkpoint(args.hidden, args.layers, args.rank, args.vocab)
    return base, adapter, (f"random Llama, hidden {args.hidden}, {args.layers} layers, vocab "
                           f"{args.vocab}, LoRA r={args.rank}")


def qwen_checkpoint(shape: QwenShape, out: str, device: torch.device) -> tuple[str, str]:
    """Random Qwen2 base (bf16 on CUDA, fp32 elsewhere) + tokenizer, LoRA adapter on all linear
    layers and an AdamW state after 2 real steps on random tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = build_tokenizer(TinyConfig(vocab_size=shape.vocab))
    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base, adapter = os.path.join(out, "base"), os.path.join(out, "adapter")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank,
                                             target_modules=list(LORA_TARGETS),
                                             lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(2, shape.vocab, (4, 32), generator=gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(adapter)
    torch.save(opt.state_dict(), os.path.join(adapter, "optimizer.pt"))
    del model, opt, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return base, adapter


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
               vocab: int, microbatch: int = 2, seed: int = 0,
               estimator: str = "full_vocabulary") -> ProbeSpec:
    """A probe of a random client batch, token-mean entropy with the given estimator."""
    return ProbeSpec(
        checkpoint=CheckpointSpec(base, adapter),
        rollouts=client_rollouts(num_prompts, group, max_new_tokens, vocab, seed),
        responses_per_prompt=group, reward_kind="provided",
        generation=GenerationSpec(max_new_tokens=max_new_tokens),
        entropy=EntropySpec(normalization="token_mean", estimator=estimator),
        realized=RealizedSpec(lr_multipliers=[1.0]), microbatch_size=microbatch, seed=seed)
