"""Probe cost in training steps (issue 7).

On one model and one batch (32k vocabulary, B=32 prompts, G=4 client responses of random token
ids, ≤ 40 new tokens, random 0/1 rewards), time side by side in one process:
  (a) a plain training step: forward + backward of the same sequences, same chunking, through the
      same teacher-forcing code (probe_core.teacher_forcing) with a GRPO loss −(1/B) Σ c^Y S;
  (b) the probe (run_probe), phase by phase from its `timing`; cost = total − load − rollouts;
  (c) the original design's schedule, implemented here as a baseline: no-grad S, a separate X
      pass, Y pass, per-prompt diagonal pass (X_n and Y_n: 2 forwards, 2 backwards), a separate
      gradient pass for the step, and the realized forward.
Prints a table, probe/training-step and baseline/training-step, and passes per sequence.

Times are wall-clock seconds and, beside them, this process's CPU seconds: on a shared machine
the CPU seconds of a single-threaded run (the default, --threads 1) are the steadier measure,
because a busy neighbour stretches wall time but not CPU time (and stalls multi-threaded
OpenMP regions badly).

    python -m bench.cost [--hidden 256 --layers 4 --rank 8 --prompts 32 --group 4 --tokens 40]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bench.common import add_model_args, checkpoint, probe_spec
from probe_core import rewards as rw
from probe_core.adamw import AdamWState, adamw_step
from probe_core.checkpoint import ModelCache, open_checkpoint
from probe_core.gradients import FlatParams
from probe_core.probe import PHASES, ProbeHooks, resolve_device, run_probe
from probe_core.rollouts import from_client
from probe_core.spec import ProbeSpec, RuntimeOptions
from probe_core.step import ParameterSwap
from probe_core.estimators.base import contiguous_layout
from probe_core.teacher_forcing import TeacherForcer, all_logprobs


@contextlib.contextmanager
def prepared(spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache):
    """The loaded checkpoint, the client batch, a TeacherForcer and per-sequence c^X, c^Y
    (exact mode: a unit is one prompt), built as run_probe builds them."""
    device = resolve_device(opts.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    with open_checkpoint(spec.checkpoint, opts, device, cache) as ck:
        batch, rewards = from_client(spec.rollouts, ck.tokenizer, ck.model, spec.prompt_format)
        b, g = batch.num_prompts, batch.group_size
        forcer = TeacherForcer(ck.model, batch, spec.generation.temperature, device, autocast)
        units = contiguous_layout(b, g, 1).chunks(spec.microbatch_size)
        adv = rw.advantages(rewards, spec.objective.advantage)                   # [B, G]
        ell = rw.length_norm(batch.lengths.view(b, g), spec.objective.length_norm,
                             spec.generation.max_new_tokens)
        c_y = (adv / (g * ell)).reshape(-1)                                        # [N]
        yield ck, batch, forcer, units, c_y


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


def training_step(spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache
                  ) -> tuple[float, float]:
    """(wall, CPU) seconds of one plain forward + backward over the batch (grads accumulated
    in .grad, as a trainer does before its optimizer step)."""
    with prepared(spec, opts, cache) as (ck, batch, forcer, units, c_y):
        params = [p for _, p in ck.params]
        b = batch.num_prompts
        _sync(forcer.device)
        clock = Clock()
        for rows in (c for u in units for c in u):
            s = forcer.logprobs(rows, grad=True)                                   # [n]
            loss = -(c_y[rows].float().to(s.device) * s).sum() / b
            loss.backward()
        _sync(forcer.device)
        seconds = clock.lap()
        for p in params:
            p.grad = None
    return seconds


def baseline(spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache
             ) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """The original schedule: every gradient sum from its own forward + backward.
    Returns (wall, CPU) seconds per phase and "cost", and sequences per pass kind."""
    timing: dict[str, tuple[float, float]] = {}
    passes = {"forward_no_grad": 0, "forward_grad": 0, "backward": 0}
    with prepared(spec, opts, cache) as (ck, batch, forcer, units, c_y):
        dev = forcer.device
        flat = FlatParams.of([p for _, p in ck.params])
        b, g = batch.num_prompts, batch.group_size
        chunks = [c for u in units for c in u]
        n_seq = batch.num_sequences

        def grad_sum(chunk_list, coef: torch.Tensor) -> torch.Tensor:
            acc = torch.zeros(flat.numel, device=dev)                              # [P]
            for rows in chunk_list:
                s = forcer.logprobs(rows, grad=True)
                grads = torch.autograd.grad((coef[rows].float().to(dev) * s).sum(),
                                            flat.params, allow_unused=True)
                acc += flat.flatten(grads)
                passes["forward_grad"] += len(rows)
                passes["backward"] += len(rows)
            return acc.cpu().double()

        clock = Clock()

        def lap(name: str) -> None:
            _sync(dev)
            timing[name] = clock.lap()

        s = all_logprobs(forcer, chunks)                                           # [N]
        passes["forward_no_grad"] += n_seq
        sv = s.double().view(b, g)
        c_x = ((sv - (sv.sum(1, keepdim=True) - sv) / (g - 1)) / g).reshape(-1)
        lap("teacher_forcing")
        x_bar = grad_sum(chunks, c_x) / b
        lap("x_pass")
        y_bar = grad_sum(chunks, c_y) / b
        lap("y_pass")
        diag = torch.zeros(b, dtype=torch.float64)
        for n, unit in enumerate(units):
            diag[n] = grad_sum(unit, c_x) @ grad_sum(unit, c_y)
        lap("diagonal")
        grad_sum(chunks, c_y)              # the step's own loss gradient, as a trainer takes it
        lap("step_gradient")
        swap = ParameterSwap(flat)
        step = adamw_step(AdamWState.from_states(ck.states, spec.lr_override), y_bar,
                          swap.theta(), spec.max_grad_norm)
        _ = x_bar @ (step.d * y_bar) - diag.sum() / (b * (b - 1))
        swap.apply(step.delta, 1.0)
        try:
            all_logprobs(forcer, chunks)
            passes["forward_no_grad"] += n_seq
        finally:
            swap.restore()
        lap("realized")
        timing["cost"] = tuple(sum(v[k] for v in timing.values()) for k in (0, 1))
    return timing, passes


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2, help="probe runs (training steps: one "
                    "more, interleaved)")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, adapter = checkpoint(args.hidden, args.layers, args.rank, args.vocab)
    spec = probe_spec(base, adapter, args.prompts, args.group, args.tokens, args.vocab,
                      args.microbatch)
    opts = RuntimeOptions(device=args.device)
    cache = ModelCache()
    n_seq = args.prompts * args.group

    warm = probe_spec(base, adapter, 4, args.group, args.tokens, args.vocab, args.microbatch)
    training_step(warm, opts, cache)                                      # warm-up, untimed
    run_probe(warm, opts, cache)
    train, probes = [training_step(spec, opts, cache)], []
    for _ in range(args.repeats):
        out, phases = probe(spec, opts, cache)
        probes.append(phases)
        train.append(training_step(spec, opts, cache))
    base_timing, base_passes = ({}, {}) if args.no_baseline else baseline(spec, opts, cache)
    step = tuple(_median([t[k] for t in train]) for k in (0, 1))
    med = {ph: tuple(_median([p[ph][k] for p in probes]) for k in (0, 1)) for ph in probes[0]}

    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA r="
          f"{args.rank}; B={args.prompts} G={args.group} ≤{args.tokens} new tokens, "
          f"microbatch {args.microbatch}, {out.batch.mean_response_tokens:.1f} response "
          f"tokens/seq, device {out.device}, grad_method {out.grad_method}, "
          f"{torch.get_num_threads()} threads")
    print(f"\n{'':34}{'wall s':>8}{'/ step':>8}{'CPU s':>8}{'/ step':>8}")
    rows = [(f"training step (median of {len(train)})", step)]
    rows += [(f"  run {k + 1}", t) for k, t in enumerate(train)]
    rows += [(f"probe {ph} (median of {len(probes)})", med[ph]) for ph in
             ("teacher_forcing", "gradients", "step", "realized")]
    rows.append(("probe cost = total-load-rollouts", med["cost"]))
    rows += [(f"  run {k + 1}", p["cost"]) for k, p in enumerate(probes)]
    rows += [(f"baseline {k}", v) for k, v in base_timing.items() if k != "cost"]
    if base_timing:
        rows.append(("baseline cost", base_timing["cost"]))
    for name, (wall, cpu) in rows:
        print(f"{name:34}{wall:8.2f}{wall / step[0]:8.2f}{cpu:8.2f}{cpu / step[1]:8.2f}")
    p = out.passes
    print(f"\nprobe passes per sequence: forward_no_grad {p.forward_no_grad / n_seq:g}, "
          f"forward_grad {p.forward_grad / n_seq:g}, backward {p.backward / n_seq:g} "
          f"(+ noise-floor check: {p.noise_check_forward} sequences once)")
    if base_passes:
        print("baseline passes per sequence: " + ", ".join(
            f"{k} {v / n_seq:g}" for k, v in base_passes.items()))
    print(f"\nprobe / training step    = {med['cost'][0] / step[0]:.2f} wall, "
          f"{med['cost'][1] / step[1]:.2f} CPU")
    if base_timing:
        print(f"baseline / training step = {base_timing['cost'][0] / step[0]:.2f} wall, "
              f"{base_timing['cost'][1] / step[1]:.2f} CPU")


if __name__ == "__main__":
    main()
