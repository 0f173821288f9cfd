"""run_probe: one probe job, phase by phase, following the pass schedule of DESIGN.md.

1. no-grad teacher forcing of all B·G sequences → S, Ĥ(θ), c^X
2. per unit, per chunk: one forward with grad, X and Y from that graph (gradients.py)
3. host algebra: Ȳ, κ, D, Δθ, U-statistic, terms, SEs (adamw.py, estimators.py)
4. one no-grad forward per lr multiplier at θ + sΔθ, parameters restored after (importance.py)

Unit vectors X_u, Y_u are kept on the host while 2·U·P·4 bytes fit spec.host_budget_bytes;
above it only their sums are kept in phase 2 and a second gradient pass recomputes each unit
to take its dot products once D is known (one more grad forward and backward per sequence,
reported in `passes` and the warnings).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch

from probe_core import rewards as rw
from probe_core.adamw import AdamWStep, Hyper, adamw_step
from probe_core.checkpoint import LoadedCheckpoint, ModelCache, open_checkpoint
from probe_core.errors import DegenerateBatch, InvalidRequest, ProbeCancelled, ProbeOutOfMemory
from probe_core.estimators import BilinearDots, covariance_proxy, delta_h1, unit_dots
from probe_core.gradients import FlatParams, GradientAccumulator
from probe_core.importance import entropy_before, snis
from probe_core.memory import MemoryTracer
from probe_core.outcome import (BatchOutcome, OptimizerOutcome, Passes, ProbeOutcome,
                                RealizedOutcome)
from probe_core.paths import confine
from probe_core.rollouts import Batch, from_client, sample
from probe_core.spec import ProbeSpec, RuntimeOptions
from probe_core.step import ParameterSwap, save_adapter
from probe_core.teacher_forcing import TeacherForcer, all_logprobs, unit_chunks

PHASES = ("load", "rollouts", "teacher_forcing", "gradients", "step", "realized")


@dataclass
class ProbeHooks:
    """Callbacks from the worker: progress(phase, done, total) and a cancel flag polled at every
    chunk boundary."""

    progress: Callable[[str, int, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_probe(spec: ProbeSpec, options: RuntimeOptions | None = None,
              cache: ModelCache | None = None, hooks: ProbeHooks | None = None) -> ProbeOutcome:
    """Run one probe. Raises ProbeError subclasses for anything the user can fix."""
    return _Probe(spec, options or RuntimeOptions(), cache or ModelCache(),
                  hooks or ProbeHooks()).run()


class _Probe:
    def __init__(self, spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache,
                 hooks: ProbeHooks):
        self.spec, self.opts, self.cache, self.hooks = spec, opts, cache, hooks
        self.device = resolve_device(opts.device)
        self.tracer = MemoryTracer(self.device, enabled=spec.trace_memory)
        self.timing: dict[str, float] = {}
        self.passes = Passes()
        self.warnings: list[str] = []
        self.phase = "load"
        self._t = time.perf_counter()

    # -- bookkeeping -------------------------------------------------------------------------
    def _enter(self, phase: str) -> None:
        self.phase = phase
        self._tick(0, 0)
        if self.opts.fault_hook == f"oom:{phase}":
            raise torch.cuda.OutOfMemoryError(f"simulated out of memory in {phase}")

    def _finish(self, phase: str) -> None:
        now = time.perf_counter()
        self.timing[phase] = now - self._t
        self._t = now
        self.tracer.mark(phase)

    def _tick(self, done: int, total: int) -> None:
        self.tracer.sample()
        if self.hooks.should_cancel and self.hooks.should_cancel():
            raise ProbeCancelled("the job was cancelled", phase=self.phase)
        if self.hooks.progress:
            self.hooks.progress(self.phase, done, total)

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> ProbeOutcome:
        t_start = time.perf_counter()
        try:
            self._enter("load")
            self.save_to = self._save_path()
            with open_checkpoint(self.spec.checkpoint, self.opts, self.device,
                                 self.cache) as ck:
                self._finish("load")
                outcome = self._run_loaded(ck)
        except torch.cuda.OutOfMemoryError as exc:
            trace = list(self.tracer.trace)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ProbeOutOfMemory(
                f"out of memory during {self.phase}: {str(exc).splitlines()[0][:200]}. "
                "Lower memory.teacher_force_microbatch_size (or generation.batch_size during "
                "rollouts) and resubmit.", phase=self.phase, trace=trace) from exc
        except Exception as exc:
            if getattr(exc, "phase", "unset") is None:
                exc.phase = self.phase
            raise
        outcome.timing["total"] = time.perf_counter() - t_start
        return outcome

    def _rollouts(self, ck: LoadedCheckpoint) -> tuple[Batch, torch.Tensor]:
        spec = self.spec
        self._enter("rollouts")
        if spec.rollouts is not None:
            rollouts = spec.rollouts[:spec.num_prompts] if spec.num_prompts else spec.rollouts
            batch, rewards = from_client(rollouts, ck.tokenizer, ck.model, spec.prompt_format)
        else:
            prompts = spec.prompts[:spec.num_prompts] if spec.num_prompts else spec.prompts
            answers = spec.answers[:len(prompts)]
            batch = sample(ck.model, ck.tokenizer, prompts, spec.prompt_format,
                           spec.responses_per_prompt, spec.generation, spec.seed, self.device,
                           on_chunk=self._tick)
            g = spec.responses_per_prompt
            rewards = torch.tensor([[rw.score(spec.reward_kind, batch.response_texts[n * g + j],
                                              answers[n]) for j in range(g)]
                                    for n in range(len(prompts))], dtype=torch.float64)
            if spec.generation.top_p < 1.0 or spec.generation.top_k > 0:
                self.warnings.append(
                    "top_p/top_k truncate the sampling distribution, while S and H use the full "
                    "softmax: δH₁ and the realized ΔH are exact only for pure temperature "
                    "sampling")
        self._finish("rollouts")
        return batch, rewards

    def _coefficients(self, batch: Batch, rewards: torch.Tensor, s: torch.Tensor,
                      per_unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c^X and c^Y per sequence [N] (float64, divided by the prompts per unit), and A."""
        b, g = batch.num_prompts, batch.group_size
        obj = self.spec.objective
        adv = rw.advantages(rewards, obj.advantage, obj.advantage_eps)          # [B, G]
        const = obj.length_norm_constant or self.spec.generation.max_new_tokens
        ell = rw.length_norm(batch.lengths.view(b, g), obj.length_norm, const)       # [B, G]
        c_y = adv / (g * ell)
        s = s.double().view(b, g)
        loo_mean = (s.sum(1, keepdim=True) - s) / (g - 1)                            # S̄_{n,−g}
        c_x = (s - loo_mean) / g
        return c_x.reshape(-1) / per_unit, c_y.reshape(-1) / per_unit, adv

    def _save_path(self) -> str | None:
        """Checked before any compute, so a bad path does not waste the probe."""
        if not self.spec.save_updated_adapter_to:
            return None
        if self.spec.checkpoint.adapter is None:
            raise InvalidRequest("save_updated_adapter_to needs checkpoint.adapter (a LoRA "
                                 "adapter to write); a full-model probe cannot save one")
        return confine(self.spec.save_updated_adapter_to, self.opts.checkpoint_roots,
                       what="save_updated_adapter_to", must_exist=False)

    def _run_loaded(self, ck: LoadedCheckpoint) -> ProbeOutcome:
        spec = self.spec
        batch, rewards = self._rollouts(ck)
        b, g = batch.num_prompts, batch.group_size
        if g < 2:
            raise DegenerateBatch("responses_per_prompt must be at least 2 (the leave-one-out "
                                  "baseline and group advantages need two)", phase="rollouts")
        per_unit = spec.estimator.block_size if spec.estimator.mode == "blocks" else 1
        if b % per_unit or b // per_unit < 2:
            raise DegenerateBatch(
                f"{b} prompts give fewer than 2 units (mode={spec.estimator.mode}, "
                f"block_size={per_unit}); δH₁ needs at least 2 independent units",
                phase="rollouts")
        units = unit_chunks(b, g, per_unit, spec.microbatch_size)
        flat_chunks = [c for u in units for c in u]

        # 1. no-grad teacher forcing
        self._enter("teacher_forcing")
        autocast = torch.bfloat16 if (self.device.type == "cuda" and self.opts.autocast_dtype
                                      in ("auto", "bfloat16")) else None
        forcer = TeacherForcer(ck.model, batch, spec.generation.temperature, self.device,
                               autocast)
        s = all_logprobs(forcer, flat_chunks, on_chunk=self._tick)                  # [N]
        self.passes.forward_no_grad += batch.num_sequences
        c_x, c_y, adv = self._coefficients(batch, rewards, s, per_unit)
        self._finish("teacher_forcing")

        # 2. gradient summaries
        self._enter("gradients")
        flat = FlatParams.of([p for _, p in ck.params])
        acc = GradientAccumulator(forcer, ck.model, flat, self.opts.grad_method)
        n_units = len(units)
        x_units, y_units, x_sum, y_sum = self._gradients(acc, units, c_x, c_y)
        self._finish("gradients")

        # 3. the AdamW step and δH₁
        self._enter("step")
        swap = ParameterSwap(flat)
        theta = swap.theta()
        hyper = Hyper.from_states(ck.states, spec.lr_override)
        x_bar, y_bar = x_sum / n_units, y_sum / n_units
        step = adamw_step(hyper, y_bar, theta, spec.max_grad_norm)
        dots = self._unit_dots(acc, units, c_x, c_y, x_units, y_units, x_bar, y_bar, step)
        estimate = delta_h1(*dots, kappa=step.kappa)
        self._warn_degenerate(adv, hyper, n_units)
        updated = None
        if self.save_to is not None:   # the real step, s = 1, whatever the multipliers are
            try:
                swap.apply(step.delta, 1.0)
                updated = save_adapter(ck.model, self.save_to)
            finally:
                swap.restore()
        self._finish("step")

        # 4. realized
        realized = None
        if spec.realized.enabled:
            self._enter("realized")
            realized = self._realized(forcer, flat_chunks, s, rewards, swap, step, b, g)
            self._finish("realized")
        out = self._outcome(ck, batch, rewards, adv, s, estimate, step, hyper, realized,
                            updated, acc.method, n_units)
        out.step, out.x_bar, out.y_bar, out.unit_x, out.unit_y = (step, x_bar, y_bar, x_units,
                                                                  y_units)
        return out

    def _gradients(self, acc: GradientAccumulator, units, c_x, c_y):
        """Phase 2: X_u, Y_u of every unit (kept on the host within the budget) and their
        sums. Returns (x_units | None, y_units | None, Σ X_u, Σ Y_u) on the host."""
        n_units, numel = len(units), acc.flat.numel
        total = sum(len(c) for c in units)
        keep = 2 * n_units * numel * 4 <= self.spec.host_budget_bytes
        x_units = torch.empty(n_units, numel) if keep else None
        y_units = torch.empty(n_units, numel) if keep else None
        # Σ_u X_u, Σ_u Y_u in float64 where the unit vectors are (the device): no per-unit
        # host arithmetic on [P] vectors while the device waits
        sums = torch.zeros(2, numel, dtype=torch.float64, device=self.device)       # [2, P]
        done = 0
        for u, chunks in enumerate(units):
            x_u, y_u, _ = self._unit(acc, chunks, c_x, c_y, done, total)
            done += len(chunks)
            sums[0] += x_u
            sums[1] += y_u
            if keep:
                x_units[u].copy_(x_u)
                y_units[u].copy_(y_u)
        x_sum, y_sum = sums.cpu()
        return x_units, y_units, x_sum, y_sum

    def _unit(self, acc: GradientAccumulator, chunks, c_x, c_y, done: int, total: int):
        counter = iter(range(done + 1, done + len(chunks) + 1))
        x_u, y_u, n_back = acc.unit(chunks, c_x, c_y,
                                    on_chunk=lambda: self._tick(next(counter), total))
        self.passes.forward_grad += sum(len(c) for c in chunks)
        self.passes.backward += n_back
        return x_u, y_u, n_back

    def _unit_dots(self, acc, units, c_x, c_y, x_units, y_units, x_bar, y_bar,
                   step: AdamWStep):
        """Per-unit dot products for δH₁, from the kept unit vectors or a recompute pass."""
        weights, vectors = [step.d, step.w_grad], [step.w_momentum, step.w_decay]
        if x_units is not None:
            (plain, grad), (mom, dec) = unit_dots(x_units, y_units, weights, vectors)
            return plain, grad, mom, dec
        self.warnings.append("unit vectors exceeded the host memory budget: a second gradient "
                             "pass recomputed them")
        dots, lin = [], []
        for chunks in units:
            x_u, y_u, _ = self._unit(acc, chunks, c_x, c_y, 0, 0)
            d, v = unit_dots(x_u.cpu()[None], y_u.cpu()[None], weights, vectors, x_bar, y_bar)
            dots.append(d)
            lin.append(v)
        return (BilinearDots.cat([d[0] for d in dots]), BilinearDots.cat([d[1] for d in dots]),
                torch.cat([v[0] for v in lin]), torch.cat([v[1] for v in lin]))

    def _warn_degenerate(self, adv: torch.Tensor, hyper: Hyper, n_units: int) -> None:
        if bool((adv == 0).all()):
            self.warnings.append("every advantage is zero (all rewards equal within each "
                                 "prompt): the gradient term is 0 and Δθ is momentum and "
                                 "weight decay only")
        if bool((hyper.lr == 0).all()):
            self.warnings.append("lr is 0 (end of a decayed schedule): every change is zero; "
                                 "set optimizer_overrides.lr to probe another step size")
        if n_units < 3:
            self.warnings.append("fewer than 3 units: the jackknife SE is undefined (null)")

    def _realized(self, forcer, chunks, s, rewards, swap: ParameterSwap, step: AdamWStep,
                  b: int, g: int) -> RealizedOutcome:
        spec = self.spec.realized
        rows = []
        total = len(chunks) * len(spec.lr_multipliers)
        try:
            for k, mult in enumerate(spec.lr_multipliers):
                swap.apply(step.delta, mult)
                offset = k * len(chunks)
                s_after = all_logprobs(forcer, chunks,
                                       on_chunk=lambda d, _: self._tick(offset + d, total))
                self.passes.forward_no_grad += s.numel()
                swap.restore()
                rows.append((mult, snis(s.view(b, g), s_after.view(b, g), spec.normalization,
                                        spec.psis, rewards)))
        finally:
            swap.restore()
        h0, h0_se = entropy_before(s.view(b, g))
        return RealizedOutcome(h0, h0_se, spec.normalization, spec.ess_threshold, rows,
                               self._noise_floor(forcer, s))

    def _noise_floor(self, forcer: TeacherForcer, s: torch.Tensor) -> float:
        """max |S − S'| over a few sequences recomputed with another chunking."""
        n = min(8, s.numel())
        size = 1 if self.spec.microbatch_size > 1 else 2
        alt = all_logprobs_subset(forcer, torch.arange(n), size)
        self.passes.noise_check_forward += n
        return float((alt - s[:n]).abs().max())

    def _outcome(self, ck, batch, rewards, adv, s, estimate, step, hyper, realized, updated,
                 method, n_units) -> ProbeOutcome:
        b, g = batch.num_prompts, batch.group_size
        first = ck.states[0]
        lr = float(hyper.lr[0]) if hyper.lr.numel() else first.lr
        optimizer = OptimizerOutcome(lr, (first.beta1, first.beta2), first.eps,
                                     first.weight_decay, int(first.step), step.grad_norm,
                                     step.kappa, len({st.group for st in ck.states}))
        summary = BatchOutcome(b, g, float(batch.lengths.double().mean()),
                               float(rewards.mean()), int((adv == 0).all(1).sum()))
        for phase in PHASES:
            self.timing.setdefault(phase, 0.0)
        return ProbeOutcome(estimate, self.spec.estimator.mode, n_units, realized, summary,
                            covariance_proxy(s.view(b, g), adv), lr, optimizer, self.passes,
                            self.timing, self.tracer, str(self.device), updated, method,
                            ck.base_reused, self.warnings)


def all_logprobs_subset(forcer: TeacherForcer, rows: torch.Tensor, size: int) -> torch.Tensor:
    return all_logprobs(forcer, list(rows.split(size)))[rows]
