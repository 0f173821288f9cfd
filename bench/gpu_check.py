"""GPU check for issues 6 and 7 on a Qwen2.5-1.5B-shaped model (randomly initialised).

Builds a Qwen2 model with the real 1.5B sizes (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocabulary 151936, tied embeddings) in bf16, a local tokenizer, a LoRA r=16
adapter on q,k,v,o,gate,up,down with an AdamW state after 2 real steps; then runs the probe on
client rollouts (G=4, 64 new tokens) at microbatch 1 and 2, B=8 then B=32, and records
  - peak device memory per run and the ratio B=32 / B=8 (target: within 5%),
  - the cost ratios of bench/cost.py in bf16: probe / training step, and tokens per second of
    the gradient pass against the training step,
into $OUT/gpu_check.json (or --out). Imports probe_core and bench only (no fastapi/pydantic).

    python -m bench.gpu_check            # on a CUDA machine
    python -m bench.gpu_check --smoke    # tiny sizes, any device (CPU here): checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from bench.common import probe_spec
from bench.cost import probe, training_step
from probe_core.checkpoint import ModelCache
from probe_core.probe import resolve_device, run_probe
from probe_core.spec import ProbeSpec, RuntimeOptions
from probe_core.tiny import LORA_TARGETS, TinyConfig, build_tokenizer


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rank: int
    tokens: int
    prompts: tuple[int, ...]
    microbatches: tuple[int, ...]
    group: int = 4


QWEN_1_5B = Shape(1536, 28, 12, 2, 8960, 151936, 16, 64, (8, 32), (1, 2))
SMOKE = Shape(64, 2, 4, 2, 128, 1024, 4, 8, (2, 4), (1, 2))


def build_checkpoint(shape: Shape, out: str, device: torch.device) -> tuple[str, str]:
    """Random Qwen2 base (bf16 on CUDA, fp32 elsewhere) + tokenizer, LoRA adapter and AdamW
    state after 2 real steps on random tokens."""
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


def spec_for(base: str, adapter: str, shape: Shape, prompts: int, microbatch: int
             ) -> ProbeSpec:
    return probe_spec(base, adapter, prompts, shape.group, shape.tokens, shape.vocab,
                      microbatch, seed=prompts)


def memory_runs(base, adapter, shape, opts, cache, device) -> list[dict]:
    runs = []
    for mb in shape.microbatches:
        for b in shape.prompts:
            out = run_probe(spec_for(base, adapter, shape, b, mb), opts, cache)
            compute = [p.device_peak_bytes for p in out.memory.trace
                       if p.phase not in ("load", "rollouts") and p.device_peak_bytes is not None]
            runs.append({
                "prompts": b, "group": shape.group, "microbatch": mb,
                "peak_device_bytes": out.memory.peak_device_bytes,
                "peak_device_bytes_after_load": max(compute) if compute else None,
                "allocated_after_bytes": (torch.cuda.memory_allocated(device)
                                          if device.type == "cuda" else None),
                "peak_host_rss_bytes": out.memory.peak_host_rss_bytes,
                "seconds": out.timing["total"], "grad_method": out.grad_method,
                "delta_h1": out.delta_h1.total, "delta_h1_se": out.delta_h1.se,
                "realized_delta_h": out.realized.main[1].delta_h if out.realized else None,
                "trace": [vars(p) for p in out.memory.trace]})
            print(f"B={b:3d} G={shape.group} microbatch={mb}: peak device "
                  f"{_mib(out.memory.peak_device_bytes)} MiB, host RSS "
                  f"{_mib(out.memory.peak_host_rss_bytes)} MiB, {out.timing['total']:.1f} s",
                  flush=True)
    return runs


def cost_ratios(base, adapter, shape, opts, cache) -> dict:
    """bench/cost.py's ratios at the largest B and microbatch (bf16 autocast on CUDA)."""
    spec = spec_for(base, adapter, shape, max(shape.prompts), max(shape.microbatches))
    training_step(spec, opts, cache)                                          # warm-up
    steps, costs = [training_step(spec, opts, cache)], []
    for _ in range(2):
        out, phases = probe(spec, opts, cache)
        costs.append(phases)
        steps.append(training_step(spec, opts, cache))
    step = sorted(w for w, _ in steps)[len(steps) // 2]
    cost = sorted(p["cost"][0] for p in costs)[len(costs) // 2]
    grad = sorted(p["gradients"][0] for p in costs)[len(costs) // 2]
    n_seq = max(shape.prompts) * shape.group
    tokens = out.batch.mean_response_tokens * n_seq
    return {"prompts": max(shape.prompts), "microbatch": max(shape.microbatches),
            "training_step_s": step, "probe_cost_s": cost, "probe_over_training_step": cost / step,
            "phases_s": {k: v[0] for k, v in costs[-1].items()},
            "gradient_pass_tokens_per_s": tokens / grad,
            "training_step_tokens_per_s": tokens / step,
            "gradient_pass_over_training_step_tokens_per_s": step / grad,
            "passes_per_sequence": {k: v / n_seq for k, v in vars(out.passes).items()},
            "grad_method": out.grad_method}


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; runs on CPU too")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: run with --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    shape = SMOKE if args.smoke else QWEN_1_5B
    opts = RuntimeOptions(device=str(device), autocast_dtype="bfloat16")
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or "cpu", "smoke": args.smoke, "shape": vars(shape),
               "torch": torch.__version__}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build_checkpoint(shape, tmp, device)
        summary["build_seconds"] = time.perf_counter() - t0
        cache = ModelCache()
        run_probe(spec_for(base, adapter, shape, 2, 1), opts, cache)   # load the base once
        summary["memory_runs"] = memory_runs(base, adapter, shape, opts, cache, device)
        key = "peak_device_bytes" if device.type == "cuda" else "peak_host_rss_bytes"
        ratios = {}
        for mb in shape.microbatches:
            by_b = {r["prompts"]: r for r in summary["memory_runs"] if r["microbatch"] == mb}
            lo, hi = min(by_b), max(by_b)
            ratios[f"microbatch_{mb}"] = by_b[hi][key] / by_b[lo][key]
        summary["peak_ratio_largest_over_smallest_B"] = ratios
        summary["peak_ratio_key"] = key
        summary["within_5_percent"] = all(r <= 1.05 for r in ratios.values())
        summary["cost"] = cost_ratios(base, adapter, shape, opts, cache)
    summary["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    c = summary["cost"]
    print(f"\npeak {key} B={max(shape.prompts)}/B={min(shape.prompts)}: "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(f"probe / training step = {c['probe_over_training_step']:.2f}; gradient pass "
          f"tokens/s = {c['gradient_pass_over_training_step_tokens_per_s']:.2f} × training "
          f"step's; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
