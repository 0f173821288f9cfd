"""GPU check for issues 6, 7 and 17 on a Qwen2.5-1.5B-shaped model (randomly initialised).

Builds a Qwen2 model with the real 1.5B sizes (hidden 1536, 28 layers, 12 heads, 2 KV heads,
intermediate 8960, vocabulary 151936, tied embeddings) in bf16, a local tokenizer, a LoRA r=16
adapter on q,k,v,o,gate,up,down with an AdamW state after 2 real steps; then, for each probe
mode in MODES (token-mean entropy with the sampled and the full-vocabulary estimator; issue 14
adds two-batch there), runs the probe on client rollouts (G=4, 64 new tokens) at microbatch 1
and 2, B=8 then B=32, and records
  - peak device memory per run and the ratio B=32 / B=8 (target: within 5%),
  - the cost ratios of bench/cost.py in bf16: probe / training step (targets: 1.6 sampled,
    2.2 full_vocabulary), and tokens per second of the gradient pass against the training step,
into $OUT/gpu_check.json (or --out), one JSON. Imports probe_core and bench only (no
fastapi/pydantic).

    python -m bench.gpu_check            # on a CUDA machine
    python -m bench.gpu_check --smoke    # tiny sizes, any device (CPU here): checks it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from typing import Callable

from bench.common import QwenShape, probe_spec, qwen_checkpoint
from bench.cost import probe, training_step
from probe_core.checkpoint import ModelCache
from probe_core.probe import resolve_device, run_probe
from probe_core.spec import EntropyBatchSpec, ProbeSpec, RuntimeOptions

def _with_estimator(spec: ProbeSpec, estimator: str) -> ProbeSpec:
    spec.entropy.estimator = estimator
    return spec


def _two_batch(spec: ProbeSpec) -> ProbeSpec:
    """Held-out E prompts (as many as the U batch has, one response each) under the U step."""
    spec.entropy_batch = EntropyBatchSpec(
        prompts=[f"held out {k} {r.prompt}" for k, r in enumerate(spec.rollouts)],
        responses_per_prompt=1)
    return spec


# name → how its spec is made from the (token-mean, full-vocabulary) spec of a batch
MODES: dict[str, Callable[[ProbeSpec], ProbeSpec]] = {
    "sampled": lambda spec: _with_estimator(spec, "sampled"),
    "full_vocabulary": lambda spec: _with_estimator(spec, "full_vocabulary"),
    "two_batch": _two_batch,
}


@dataclass
class Shape:
    model: QwenShape
    tokens: int
    prompts: tuple[int, ...]
    microbatches: tuple[int, ...]
    group: int = 4


QWEN_1_5B = Shape(QwenShape(1536, 28, 12, 2, 8960, 151936, 16), 64, (8, 32), (1, 2))
SMOKE = Shape(QwenShape(64, 2, 4, 2, 128, 1024, 4), 8, (2, 4), (1, 2))


def spec_for(base: str, adapter: str, shape: Shape, prompts: int, microbatch: int,
             mode: str = "full_vocabulary") -> ProbeSpec:
    return MODES[mode](probe_spec(base, adapter, prompts, shape.group, shape.tokens,
                                  shape.model.vocab, microbatch, seed=prompts))


def memory_runs(base, adapter, shape, opts, cache, device, mode: str) -> list[dict]:
    runs = []
    for mb in shape.microbatches:
        for b in shape.prompts:
            out = run_probe(spec_for(base, adapter, shape, b, mb, mode), opts, cache)
            compute = [p.device_peak_bytes for p in out.memory.trace
                       if p.phase not in ("load", "rollouts") and p.device_peak_bytes is not None]
            runs.append({
                "mode": mode, "prompts": b, "group": shape.group, "microbatch": mb,
                "peak_device_bytes": out.memory.peak_device_bytes,
                "peak_device_bytes_after_load": max(compute) if compute else None,
                "allocated_after_bytes": (torch.cuda.memory_allocated(device)
                                          if device.type == "cuda" else None),
                "peak_host_rss_bytes": out.memory.peak_host_rss_bytes,
                "seconds": out.timing["total"], "grad_method": out.grad_method,
                "delta_h1": out.delta_h1.total, "delta_h1_se": out.delta_h1.se,
                "realized_delta_h": out.realized.main[1].delta_h if out.realized else None,
                "trace": [vars(p) for p in out.memory.trace]})
            print(f"{mode:16} B={b:3d} G={shape.group} microbatch={mb}: peak device "
                  f"{_mib(out.memory.peak_device_bytes)} MiB, host RSS "
                  f"{_mib(out.memory.peak_host_rss_bytes)} MiB, {out.timing['total']:.1f} s",
                  flush=True)
    return runs


def cost_ratios(base, adapter, shape, opts, cache, mode: str) -> dict:
    """bench/cost.py's ratios at the largest B and microbatch (bf16 autocast on CUDA)."""
    spec = spec_for(base, adapter, shape, max(shape.prompts), max(shape.microbatches), mode)
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
               else platform.processor() or "cpu", "smoke": args.smoke, "shape": dataclasses.asdict(shape),
               "torch": torch.__version__}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = qwen_checkpoint(shape.model, tmp, device)
        summary["build_seconds"] = time.perf_counter() - t0
        cache = ModelCache()
        run_probe(spec_for(base, adapter, shape, 2, 1), opts, cache)   # load the base once
        key = "peak_device_bytes" if device.type == "cuda" else "peak_host_rss_bytes"
        summary["peak_ratio_key"] = key
        summary["modes"] = {}
        for mode in MODES:
            runs = memory_runs(base, adapter, shape, opts, cache, device, mode)
            ratios = {}
            for mb in shape.microbatches:
                by_b = {r["prompts"]: r for r in runs if r["microbatch"] == mb}
                lo, hi = min(by_b), max(by_b)
                ratios[f"microbatch_{mb}"] = by_b[hi][key] / by_b[lo][key]
            summary["modes"][mode] = {
                "memory_runs": runs, "peak_ratio_largest_over_smallest_B": ratios,
                "within_5_percent": all(r <= 1.05 for r in ratios.values()),
                "cost": cost_ratios(base, adapter, shape, opts, cache, mode)}
    summary["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1, default=str)
    for mode, m in summary["modes"].items():
        c = m["cost"]
        print(f"{mode}: peak {key} B={max(shape.prompts)}/B={min(shape.prompts)}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in m["peak_ratio_largest_over_smallest_B"]
                          .items())
              + f"; probe / training step = {c['probe_over_training_step']:.2f}; gradient "
              f"pass tokens/s = {c['gradient_pass_over_training_step_tokens_per_s']:.2f} × "
              "training step's")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
