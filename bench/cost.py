"""Probe cost in training steps, for the sampled and the full-vocabulary estimator (issue 17).

On one model and one batch (default: 32k vocabulary, B=32 prompts, G=4 client responses of
random token ids, ≤ 40 new tokens, random 0/1 rewards; `--model qwen2.5-0.5b`: the real
Qwen2.5-0.5B shapes cut to 4 layers, B=8 and B=16, 64 new tokens, microbatch 1), time side by
side in one process:
  (a) a plain training step: forward + backward of the same sequences, same chunking, through
      the same teacher-forcing code (probe_core.teacher_forcing, its fused LM head: the head's
      input-gradient is taken in the forward, as fused linear cross-entropy kernels such as
      Liger's do) with the GRPO loss −(1/B) Σ c^Y S;
  (b) the probe (run_probe) with token-mean entropy and each estimator, phase by phase from its
      `timing`; cost = total − load − rollouts.
Runs interleave (training step, sampled probe, full-vocabulary probe, training step, ...), so
a busy neighbour slows all of them alike. Prints the table, probe / training step for both
estimators against their targets (≤ 1.6 sampled, ≤ 2.2 full_vocabulary) and the passes per
sequence.

Times are wall-clock seconds and, beside them, this process's CPU seconds: on a shared machine
the CPU seconds of a single-threaded run (the default, --threads 1) are the steadier measure,
because a busy neighbour stretches wall time but not CPU time.

    python -m bench.cost [--model tiny32k|qwen2.5-0.5b] [--prompts 32] [--group 4]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.common import ESTIMATORS, add_model_args, probe_spec, resolve_model_args
from probe_core.checkpoint import ModelCache, open_checkpoint
from probe_core.entropy import logprob_objective
from probe_core.estimators.base import contiguous_layout
from probe_core.objective import update_weights
from probe_core.probe import PHASES, ProbeHooks, resolve_device, run_probe
from probe_core.rollouts import from_client
from probe_core.spec import ProbeSpec, RuntimeOptions
from probe_core.teacher_forcing import TeacherForcer

TARGETS = {"sampled": 1.6, "full_vocabulary": 2.2}     # issue 17, in training steps


@contextlib.contextmanager
def prepared(spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache):
    """The loaded checkpoint, the client batch, a TeacherForcer, the chunks and c^Y, built as
    run_probe builds them."""
    device = resolve_device(opts.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    with open_checkpoint(spec.checkpoint, opts, device, cache) as ck:
        batch, rewards = from_client(spec.rollouts, ck.tokenizer, ck.model, spec.prompt_format)
        forcer = TeacherForcer(ck.model, batch, spec.generation.temperature, device, autocast)
        chunks = [c for u in contiguous_layout(batch.num_prompts, batch.group_size, 1)
                  .chunks(spec.microbatch_size) for c in u]
        c_y = update_weights(spec.objective, spec.generation.max_new_tokens, rewards,
                             batch.lengths).c_y                                   # [N]
        yield ck, batch, forcer, chunks, c_y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU seconds since construction."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def training_step(spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache,
                  fused: bool = True) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain forward + backward over the batch (grads accumulated
    in .grad, as a trainer does before its optimizer step). fused=False: the LM head
    checkpointed inside the graph instead (run again in the backward), the first round's
    baseline."""
    with prepared(spec, opts, cache) as (ck, batch, forcer, chunks, c_y):
        params = [p for _, p in ck.params]
        b = batch.num_prompts
        _sync(forcer.device)
        clock = Clock()
        for rows in chunks:
            # the loss −(1/B) Σ c^Y S through the same fused head as the probe (the head's
            # input-gradient taken in the forward, as fused linear cross-entropy kernels do)
            objective = logprob_objective(forcer.tokens(rows, grad=True, fused=fused))
            outputs, grad_outputs = objective.backward_args(-c_y[rows].to(forcer.device) / b)
            torch.autograd.backward(outputs, grad_outputs)
        _sync(forcer.device)
        seconds = clock.lap()
        for p in params:
            p.grad = None
    return seconds


class PhaseClock:
    """ProbeHooks.progress callback: CPU seconds per probe phase (the wall seconds come from
    the outcome's `timing`)."""

    def __init__(self):
        self.phase, self.clock, self.cpu = None, Clock(), {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.close()
            self.phase = phase

    def close(self) -> None:
        _, cpu = self.clock.lap()
        if self.phase is not None:
            self.cpu[self.phase] = self.cpu.get(self.phase, 0.0) + cpu


def probe(spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache):
    """run_probe with per-phase CPU seconds. Returns (outcome, {phase: (wall, CPU)})."""
    clock = PhaseClock()
    out = run_probe(spec, opts, cache, ProbeHooks(progress=clock))
    clock.close()
    phases = {ph: (out.timing.get(ph, 0.0), clock.cpu.get(ph, 0.0)) for ph in PHASES}
    # wall: total − load − rollouts, as the result reports it; CPU: the same span (the time
    # after the last phase mark is counted in that phase by PhaseClock.close)
    phases["cost"] = (out.timing["total"] - out.timing["load"] - out.timing["rollouts"],
                      sum(v[1] for ph, v in phases.items() if ph not in ("load", "rollouts")))
    return out, phases


def _median(values: list[float]) -> float:
    v = sorted(values)
    return 0.5 * (v[(len(v) - 1) // 2] + v[len(v) // 2])


def measure(args, base: str, adapter: str, num_prompts: int, opts: RuntimeOptions,
            cache: ModelCache) -> dict:
    """Interleaved training steps and probes of both estimators at one batch size."""
    specs = {est: probe_spec(base, adapter, num_prompts, args.group, args.tokens, args.vocab,
                             args.microbatch, estimator=est) for est in ESTIMATORS}
    step_spec = specs["full_vocabulary"]
    train, probes, outs = [training_step(step_spec, opts, cache)], {e: [] for e in ESTIMATORS}, {}
    checkpointed = [training_step(step_spec, opts, cache, fused=False)]
    for _ in range(args.repeats):
        for est in ESTIMATORS:
            outs[est], phases = probe(specs[est], opts, cache)
            probes[est].append(phases)
        train.append(training_step(step_spec, opts, cache))
        checkpointed.append(training_step(step_spec, opts, cache, fused=False))
    step = tuple(_median([t[k] for t in train]) for k in (0, 1))
    med = {est: {ph: tuple(_median([p[ph][k] for p in runs]) for k in (0, 1))
                 for ph in runs[0]} for est, runs in probes.items()}
    return {"prompts": num_prompts, "train": train, "step": step, "median": med,
            "runs": probes, "outs": outs,
            "checkpointed": tuple(_median([t[k] for t in checkpointed]) for k in (0, 1))}


def report(args, m: dict) -> None:
    step, med, outs = m["step"], m["median"], m["outs"]
    n_seq = m["prompts"] * args.group
    out = outs["full_vocabulary"]
    print(f"\nB={m['prompts']} G={args.group} ≤{args.tokens} new tokens, microbatch "
          f"{args.microbatch}, {out.batch.mean_response_tokens:.1f} response tokens/seq, "
          f"device {out.device}, grad_method {out.grad_method}, {torch.get_num_threads()} "
          "threads")
    print(f"{'':40}{'wall s':>8}{'/ step':>8}{'CPU s':>8}{'/ step':>8}")
    rows = [(f"training step (median of {len(m['train'])})", step)]
    rows += [(f"  run {k + 1}", t) for k, t in enumerate(m["train"])]
    rows.append(("training step, checkpointed head", m["checkpointed"]))
    for est in ESTIMATORS:
        rows += [(f"{est} {ph}", med[est][ph]) for ph in
                 ("teacher_forcing", "gradients", "step", "realized")]
        rows.append((f"{est} probe cost (median of {len(m['runs'][est])})", med[est]["cost"]))
    for name, (wall, cpu) in rows:
        print(f"{name:40}{wall:8.2f}{wall / step[0]:8.2f}{cpu:8.2f}{cpu / step[1]:8.2f}")
    for est in ESTIMATORS:
        p = outs[est].passes
        print(f"{est:16} passes per sequence: forward_grad {p.forward_grad / n_seq:g}, "
              f"backward {p.backward / n_seq:g}, forward_no_grad {p.forward_no_grad / n_seq:g}"
              f" (+ noise-floor check: {p.noise_check_forward} sequences once)")
    old = m["checkpointed"]
    for est in ESTIMATORS:
        wall, cpu = med[est]["cost"]
        verdict = "within" if cpu / step[1] <= TARGETS[est] else "ABOVE"
        print(f"probe / training step, {est:16} = {wall / step[0]:.2f} wall, "
              f"{cpu / step[1]:.2f} CPU  (target ≤ {TARGETS[est]}: {verdict}); against the "
              f"checkpointed-head step {wall / old[0]:.2f} wall, {cpu / old[1]:.2f} CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, nargs="+", default=None)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="probe runs per estimator "
                    "(training steps: one more, interleaved)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, adapter, description = resolve_model_args(args)
    opts = RuntimeOptions(device=args.device)
    cache = ModelCache()
    warm = probe_spec(base, adapter, 2, args.group, min(args.tokens, 8), args.vocab,
                      args.microbatch)
    training_step(warm, opts, cache)                                      # warm-up, untimed
    run_probe(warm, opts, cache)
    print(f"model: {description}")
    for num_prompts in args.prompts:
        report(args, measure(args, base, adapter, num_prompts, opts, cache))


if __name__ == "__main__":
    main()
