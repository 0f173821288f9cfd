"""run_probe: one probe job, phase by phase, following the pass schedule of docs/method.md.

1. the units (estimator.layout) and the update weights c^Y from rewards and lengths
2. per unit, per chunk: one forward with grad → S, T, f, m of each sequence (detached) and the
   weighted sums of ∇S (one backward) and, full_vocabulary, of ∇F (a second)  (gradients.py)
3. batch scalars, Ȳ, κ, D, Δθ, unit dots, δH₁ and its SEs          (adamw.py, estimators/)
4. one no-grad forward per lr multiplier at θ + sΔθ, restored after → S⁺, f⁺, SNIS
Phase 1 keeps the name `teacher_forcing` of the first round's no-grad pass, which is gone:
S now comes from the gradient forward (issue 17).

Each stage hands the next a small dataclass (stages.py says which are maps and which reduces).
Unit summaries are kept on the host while they fit spec.host_budget_bytes; above it only
their sums are kept in phase 2 and a second gradient pass recomputes each unit to take its dot
products once D is known (one more grad forward and backward per sequence, reported in
`passes` and the warnings).

A job over k workers runs this same code on each, with its rank's `collective`
(probe_core/collective.py): every shard holds the whole batch (the sampled responses are
gathered), maps only its block of units (`_local`), and each reduce above runs on exchanged
values, so every shard computes the same D, Δθ and estimates. Rank 0's outcome is the job's:
its passes and warnings are the job's (summed, each once), its timing and memory its own.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from probe_core.adamw import AdamWState, AdamWStep, adamw_step
from probe_core.checkpoint import LoadedCheckpoint, ModelCache, open_checkpoint
from probe_core.collective import SOLO, Collective, shard_units
from probe_core.entropy import EntropyScalars, SequenceStats, batch_scalars, on_policy_z
from probe_core.errors import (CheckpointInvalid, DeadlineExceeded, DegenerateBatch,
                               InvalidRequest, ProbeCancelled, ProbeOutOfMemory)
from probe_core.estimators import (DeltaH1, Estimator, UnitDots, UnitLayout, UnitMeans,
                                   estimator_for, unconditional_se, unit_dots)
from probe_core.gradients import FlatParams, GradientAccumulator
from probe_core.held_out import (held_out_plan, held_out_summaries, map_held_out_rows,
                                 reduce_held_out)
from probe_core.importance import (EntropySample, curvature, entropy_before,
                                   per_prompt_change, per_prompt_entropy, snis)
from probe_core.memory import MemoryTracer
from probe_core.objective import UpdateWeights, update_weights
from probe_core.outcome import (BatchOutcome, EntropyBatchOutcome, EntropyOutcome,
                                OptimizerOutcome, Passes,
                                PerPromptView, ProbeOutcome, RealizedOutcome)
from probe_core.paths import check_destination
from probe_core.proxy import covariance_proxy
from probe_core.rollouts import Batch, batch_for, sample
from probe_core.spec import PHASES, EstimatorSpec, Phase, ProbeSpec, RuntimeOptions
from probe_core.stages import (GradientShard, keeps_unit_vectors, map_gradients, map_unit_dots,
                               reduce_gradients, reduce_stats, unit_vectors)
from probe_core.reward_side import (RewardDots, RewardMeans, RewardOutcome, bonus_scale,
                                    exchange_rate, fold_bonus, informative_units, reward_dots,
                                    reward_outcome, reward_weights)
from probe_core.summaries import BONUS, REWARD, UPDATE, SummaryPlan
from probe_core.step import ParameterSwap, save_adapter
from probe_core.teacher_forcing import (SequenceValues, TeacherForcer, all_logprobs_subset,
                                        sequence_values)

__all__ = ["PHASES", "ProbeHooks", "resolve_device", "run_probe"]

MIN_GROUP_SIZE = 2          # the leave-one-out baseline and group advantages need two
MIN_UNITS_FOR_JACKKNIFE = 3
NOISE_CHECK_SEQUENCES = 4   # sequences recomputed with another chunking for the noise floor
# Below this many prompts, the single-batch realized ΔH's self-prompt and same-response excess
# over the fresh-prompt change (both O(1/B)) is large next to the change itself (issue 14).
SMALL_SINGLE_BATCH = 64
SMALL_BATCH_WARNING = (
    "single-batch mode with {b} prompts (< 64): realized.delta_h is measured on the batch's own "
    "prompts and on the very responses that built Δθ, so it adds each prompt's effect on itself "
    "and a same-response term (both shrink as 1/B) and overstates the change on fresh prompts "
    "that delta_h1 targets; pass entropy_batch (held-out prompts) to measure both on the same "
    "thing")

# |z| of entropy.on_policy_z above which client rollouts are called off-policy (on-policy, z is
# about N(0, 1): a false alarm about once in 1.7 million jobs)
OFF_POLICY_Z = 5.0
OFF_POLICY_WARNING = (
    "the client's rollouts do not look sampled from this checkpoint's policy at temperature "
    "{t:g}: their mean log-probability {s:.4g} is not minus their mean full-vocabulary entropy "
    "{f:.4g} (z = {z:.1f} over {n} responses; on-policy the two agree up to noise). delta_h1 "
    "and realized assume the responses are samples of π_τ: send the temperature (and top_p = 1, "
    "top_k = 0) they were sampled with, from this checkpoint")


@dataclass
class ProbeHooks:
    """Callbacks from the worker: progress(phase, done, total) and a cancel flag polled at every
    chunk boundary; past `deadline` (a time.monotonic() value) the next boundary raises
    DeadlineExceeded."""

    progress: Callable[[str, int, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    deadline: float | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_probe(spec: ProbeSpec, options: RuntimeOptions | None = None,
              cache: ModelCache | None = None, hooks: ProbeHooks | None = None,
              collective: Collective | None = None) -> ProbeOutcome:
    """Run one probe, or one shard of it (`collective`: this rank's view of a job over several
    workers; probe_core/collective.py). Raises ProbeError subclasses for anything the user can
    fix."""
    return _Probe(spec, options or RuntimeOptions(), cache or ModelCache(),
                  hooks or ProbeHooks(), collective or SOLO).run()


@dataclass
class _Plan:
    """What is known before the gradient pass.

    Fields: batch; rewards [B, G] float64; layout (the estimator's units); update: c^Y [N]
    and advantages [B, G]; summaries: the accumulator rows and their combination."""

    batch: Batch
    rewards: torch.Tensor
    layout: UnitLayout
    update: UpdateWeights
    summaries: SummaryPlan
    bonus_weight: float = 0.0     # c·s: TRL's entropy bonus folded into Y (reward_side)
    bonus_scale: float = 0.0      # s = B/T_tot


@dataclass
class _Measured:
    """The gradient pass's outputs: this shard's map (its units' vectors, when kept), the
    reduce over every shard (sums over all units, no vectors), every sequence's statistics
    (host, batch order) and the batch scalars."""

    shard: GradientShard
    total: GradientShard
    scalars: EntropyScalars

    @property
    def stats(self) -> SequenceStats:
        return self.total.stats


@dataclass
class _StepResult:
    """Phase 3's outputs: the AdamW state read, the means over units, the step, δH₁."""

    state: AdamWState
    means: UnitMeans
    step: AdamWStep
    estimate: DeltaH1
    updated_adapter: str | None
    reward: RewardOutcome


class _Probe:
    def __init__(self, spec: ProbeSpec, opts: RuntimeOptions, cache: ModelCache,
                 hooks: ProbeHooks, comm: Collective):
        self.spec, self.opts, self.cache, self.hooks = spec, opts, cache, hooks
        self.comm = comm
        self.device = resolve_device(opts.device)
        self.estimator: Estimator = estimator_for(
            EstimatorSpec(mode="two_batch") if spec.entropy_batch else spec.estimator)
        self.tracer = MemoryTracer(self.device, enabled=spec.trace_memory)
        self.timing: dict[str, float] = {}
        self.passes = Passes()
        self.warnings: list[str] = []
        self.phase: Phase = "load"
        self._t = time.perf_counter()

    # -- bookkeeping -------------------------------------------------------------------------
    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self._tick(0, 0)

    def _finish(self, phase: Phase) -> None:
        now = time.perf_counter()
        self.timing[phase] = self.timing.get(phase, 0.0) + now - self._t   # phases may recur
        self._t = now
        self.tracer.mark(phase)

    def _tick(self, done: int, total: int) -> None:
        self.tracer.sample()
        if self.hooks.should_cancel and self.hooks.should_cancel():
            raise ProbeCancelled("the job was cancelled", phase=self.phase)
        if self.hooks.deadline is not None and time.monotonic() > self.hooks.deadline:
            self.tracer.mark(self.phase)        # the trace ends where the job stopped
            raise DeadlineExceeded("the job ran past its deadline", phase=self.phase,
                                   trace=list(self.tracer.trace))
        if self.hooks.progress:
            self.hooks.progress(self.phase, done, total)

    def _counter(self, total: int) -> Callable[[], None]:
        """An on_chunk callback that reports 1, 2, … of total chunks done."""
        done = itertools.count(1)
        return lambda: self._tick(next(done), total)

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
            if getattr(exc, "phase", "unset") is None:   # raised outside a phase's own checks
                exc.phase = self.phase                    # (e.g. while a shard waited on its
                if isinstance(exc, DeadlineExceeded) and not exc.trace:   # peers' exchange)
                    self.tracer.mark(self.phase)
                    exc.trace = list(self.tracer.trace)
            raise
        outcome.timing["total"] = time.perf_counter() - t_start
        return outcome

    def _save_path(self) -> str | None:
        """Checked before any compute, so a bad path does not waste the probe."""
        spec = self.spec
        if not spec.save_updated_adapter_to:
            return None
        if spec.checkpoint.adapter is None:
            raise InvalidRequest("save_updated_adapter_to needs checkpoint.adapter (a LoRA "
                                 "adapter to write); a full-model probe cannot save one")
        protected = [p for p in (spec.checkpoint.adapter, spec.checkpoint.base_model) if p]
        return check_destination(spec.save_updated_adapter_to, self.opts.checkpoint_roots,
                                 protected)

    def _run_loaded(self, ck: LoadedCheckpoint) -> ProbeOutcome:
        batch, rewards = self._rollouts(ck)
        plan = self._plan(batch, rewards)
        forcer, acc = self._gradient_pass_for(ck, batch)
        measured = self._gradients(acc, plan)
        result = self._step(ck, acc, plan, measured)
        # where the entropy and its change are measured: the batch itself, or the E batch
        target_plan, target_stats, target_forcer = plan, measured.stats, forcer
        if self.spec.entropy_batch is not None:
            target_plan, target_stats, target_forcer, result = self._held_out(
                ck, measured, result)
        elif plan.batch.num_prompts < SMALL_SINGLE_BATCH:
            self.warnings.append(SMALL_BATCH_WARNING.format(b=plan.batch.num_prompts))
        realized = None
        if self.spec.realized.enabled:
            self._enter("realized")
            realized = self._realized(target_forcer, target_plan, target_stats,
                                      ParameterSwap(acc.flat), result)
            self._finish("realized")
        return self._outcome(ck, plan, measured, result, realized, acc.method,
                             target_plan if target_plan is not plan else None)

    def _held_out(self, ck: LoadedCheckpoint, u_measured: _Measured, result: _StepResult
                  ) -> tuple[_Plan, SequenceStats, TeacherForcer, _StepResult]:
        """Two-batch mode: sample the E batch, then per E unit X_u dotted with the U step; δH₁
        and its SEs from the E units (phases rollouts and gradients again)."""
        self._enter("rollouts")
        batch = sample(ck.model, ck.tokenizer, held_out_plan(self.spec), self.device,
                       on_chunk=self._tick, comm=self.comm)
        self._finish("rollouts")
        layout = self.estimator.layout(batch.num_prompts, batch.group_size)
        summaries = held_out_summaries(self.spec.entropy, batch.num_sequences, batch.group_size)
        e_plan = _Plan(batch=batch, rewards=None, layout=layout,
                       update=update_weights(self.spec.objective,
                                             self.spec.generation.max_new_tokens,
                                             torch.zeros(batch.num_prompts, batch.group_size,
                                                         dtype=torch.float64), batch.lengths),
                       summaries=summaries)
        forcer, acc = self._gradient_pass_for(ck, batch)
        self._enter("gradients")
        mb, local = self.spec.microbatch_size, self._local(layout)
        rows = map_held_out_rows(acc, local, summaries, mb, result.step, result.means.y_bar,
                                 on_chunk=self._counter(sum(map(len, local.chunks(mb)))))
        self._count_gradient_passes(rows.forward_grad, rows.backward)
        e = reduce_held_out(self.comm.exchange("gather", dataclasses.replace(rows, sums={})),
                            self.comm.exchange("sum", rows.sums), layout.num_units, summaries)
        estimate = self.estimator.delta_h1(e.dots, result.step.kappa)
        check_finite(estimate, result.state)
        estimate.se_unconditional = unconditional_se(
            estimate.se, result.step.kappa, self._u_spread(u_measured, e.x_bar, result))
        # the reward side stays the U batch's; δH₁ now comes from another batch, so the exchange
        # rate's two estimates are independent, and the bonus split and the coefficient for a
        # target (which need X and P on the same units) are not reported
        reward = dataclasses.replace(
            result.reward, entropy_bonus_term=0.0, entropy_coef_for_target=None,
            exchange_rate=exchange_rate(estimate, result.reward.delta_j1, independent=True))
        self._finish("gradients")
        return e_plan, e.stats, forcer, dataclasses.replace(result, estimate=estimate,
                                                            reward=reward)

    def _gradient_pass_for(self, ck: LoadedCheckpoint, batch: Batch
                           ) -> tuple[TeacherForcer, GradientAccumulator]:
        """The teacher forcer of a batch and the gradient accumulator over it."""
        forcer = TeacherForcer(ck.model, batch, self.spec.generation.temperature, self.device,
                               self._autocast_dtype())
        return forcer, GradientAccumulator(forcer, ck.model,
                                           FlatParams.of([p for _, p in ck.params]),
                                           self.opts.grad_method)

    def _u_spread(self, u_measured: _Measured, x_bar_e: torch.Tensor, result: _StepResult
                  ) -> torch.Tensor | None:
        """X̄_E·(W⊙Y_w) for each U unit w (the U batch's spread of the gradient term)."""
        vectors = u_measured.shard.vectors
        mine = None if vectors is None else (
            vectors[UPDATE].double() @ (result.step.w_grad * x_bar_e))            # [U_s]
        parts = self.comm.exchange("gather", mine)
        if any(p is None for p in parts):
            self.warnings.append("the U batch's unit vectors exceeded the host budget: "
                                 "delta_h1.se_unconditional is null")
            return None
        return torch.cat(parts)

    # -- phases ------------------------------------------------------------------------------
    def _rollouts(self, ck: LoadedCheckpoint) -> tuple[Batch, torch.Tensor]:
        self._enter("rollouts")
        batch, rewards, warnings = batch_for(self.spec, ck, self.device, on_chunk=self._tick,
                                             comm=self.comm)
        self.warnings += warnings
        if batch.group_size < MIN_GROUP_SIZE:
            raise DegenerateBatch("responses_per_prompt must be at least 2 (the leave-one-out "
                                  "baseline and group advantages need two)", phase="rollouts")
        self._finish("rollouts")
        return batch, rewards

    def _autocast_dtype(self) -> torch.dtype | None:
        if self.device.type == "cuda" and self.opts.autocast_dtype in ("auto", "bfloat16"):
            return torch.bfloat16
        return None

    def _plan(self, batch: Batch, rewards: torch.Tensor) -> _Plan:
        """Phase 1: the units and the update weights (the sequences' own numbers come from
        the gradient forward)."""
        layout = self.estimator.layout(batch.num_prompts, batch.group_size)
        self._enter("teacher_forcing")
        update = update_weights(self.spec.objective, self.spec.generation.max_new_tokens,
                                rewards, batch.lengths)
        objective = self.spec.objective
        # two-batch mode measures the entropy on the E batch: the U batch needs Y (and Z, P),
        # not its own X, so it skips the full-vocabulary backward
        entropy = (dataclasses.replace(self.spec.entropy, estimator="sampled")
                   if self.spec.entropy_batch else self.spec.entropy)
        summaries = SummaryPlan(entropy, {UPDATE: update.c_y, REWARD: reward_weights(rewards)},
                                batch.group_size, bonus=objective.needs_bonus_gradient)
        scale = bonus_scale(batch.lengths, batch.num_prompts)
        self._finish("teacher_forcing")
        return _Plan(batch=batch, rewards=rewards, layout=layout, update=update,
                     summaries=summaries, bonus_weight=objective.entropy_coef * scale,
                     bonus_scale=scale)

    def _gradients(self, acc: GradientAccumulator, plan: _Plan) -> _Measured:
        """Phase 2: the map over this shard's units (every unit on one worker), then the reduce
        over every shard."""
        self._enter("gradients")
        layout, mb = self._local(plan.layout), self.spec.microbatch_size
        keep = keeps_unit_vectors(layout.num_units, acc.flat.numel,
                                  len(plan.summaries.rows), self.spec.host_budget_bytes)
        shard = map_gradients(acc, layout, plan.summaries, keep, mb,
                              on_chunk=self._counter(sum(map(len, layout.chunks(mb)))))
        self._count_gradient_passes(shard.forward_grad, shard.backward)
        if plan.summaries.bonus:   # the step's direction is Y + c·s·P (TRL's entropy bonus)
            for vectors in (shard.vectors, shard.sums):
                if vectors is not None:
                    fold_bonus(vectors, UPDATE, BONUS, plan.bonus_weight)
        total = self._reduce(shard, plan.batch.num_sequences)
        self._finish("gradients")
        return _Measured(shard=shard, total=total,
                         scalars=batch_scalars(total.stats, plan.summaries.spec))

    def _local(self, layout: UnitLayout) -> UnitLayout:
        """This shard's block of the units."""
        comm = self.comm
        return layout if comm.size == 1 else layout.subset(
            shard_units(layout.num_units, comm.rank, comm.size))

    def _reduce(self, shard: GradientShard, num_sequences: int) -> GradientShard:
        """Every shard's map reduced: the sums over all units, every sequence's statistics in
        batch order."""
        parts = self.comm.exchange("gather", dataclasses.replace(shard, vectors=None, sums={}))
        return GradientShard(vectors=None, sums=self.comm.exchange("sum", shard.sums),
                             stats=reduce_stats(parts, num_sequences),
                             sequences=torch.arange(num_sequences),
                             units=sum(p.units for p in parts),
                             forward_grad=sum(p.forward_grad for p in parts),
                             backward=sum(p.backward for p in parts))

    def _count_gradient_passes(self, forward: int, backward: int) -> None:
        self.passes.forward_grad += forward
        self.passes.backward += backward

    def _step(self, ck: LoadedCheckpoint, acc: GradientAccumulator, plan: _Plan,
              measured: _Measured) -> _StepResult:
        """Phase 3: reduce to X̄, Ȳ, the AdamW step, the unit dots and δH₁."""
        self._enter("step")
        swap = ParameterSwap(acc.flat)
        state = AdamWState.from_states(ck.states, self.spec.lr_override)
        means = reduce_gradients([measured.total], measured.scalars)
        step = adamw_step(state, means.y_bar, swap.theta(), self.spec.max_grad_norm)
        shard, sums, units = measured.shard, measured.total.sums, plan.layout.num_units
        r_means = RewardMeans(x_bar=means.x_bar, y_bar=means.y_bar,
                              z_bar=sums[REWARD] / units,
                              p_bar=sums[BONUS] / units if BONUS in sums else None)
        if shard.vectors is not None:
            dots = map_unit_dots(shard, step, means, measured.scalars)
            v = shard.vectors
            r_dots = reward_dots(v["x"], v[UPDATE], v[REWARD], v.get(BONUS), step, r_means)
        else:
            dots, r_dots = self._recomputed_dots(acc, plan, measured.scalars, step, means,
                                                 r_means)
        parts = self.comm.exchange("gather", (dots, r_dots))       # in unit order
        dots = UnitDots.cat([d for d, _ in parts])
        r_dots = RewardDots.cat([r for _, r in parts])
        estimate = self.estimator.delta_h1(dots, step.kappa)
        check_finite(estimate, state)
        objective = self.spec.objective
        estimate, reward = reward_outcome(
            estimate, r_dots, step.kappa, informative_units(plan.rewards, plan.layout),
            objective.entropy_coef, plan.bonus_scale, objective.target_delta_h)
        self._warn_degenerate(plan.update.advantages, state, plan.layout.num_units)
        updated = None
        if self.save_to is not None and self.comm.rank == 0:   # the real step, s = 1
            try:
                swap.apply(step.delta, 1.0)
                updated = save_adapter(ck.model, self.save_to)
            finally:
                swap.restore()
        self._finish("step")
        return _StepResult(state=state, means=means, step=step, estimate=estimate,
                           updated_adapter=updated, reward=reward)

    def _recomputed_dots(self, acc: GradientAccumulator, plan: _Plan, scalars: EntropyScalars,
                         step: AdamWStep, means: UnitMeans, r_means: RewardMeans
                         ) -> tuple[UnitDots, RewardDots]:
        """The unit dots when the unit summaries did not fit the host: each unit again."""
        self.warnings.append("unit vectors exceeded the host memory budget: a second gradient "
                             "pass recomputed them")
        layout, parts, r_parts = self._local(plan.layout), [], []
        for u, chunks in enumerate(layout.chunks(self.spec.microbatch_size)):
            grad = acc.unit(chunks, plan.summaries, layout.prompt_weight[layout.prompts[u]],
                            on_chunk=self._counter(0))
            self._count_gradient_passes(grad.forward_grad, grad.backward)
            v = {k: t.cpu()[None] for k, t in grad.summary.vectors().items()}
            if plan.summaries.bonus:
                fold_bonus(v, UPDATE, BONUS, plan.bonus_weight)
            x = scalars.entropy_vector(v["entropy"], v.get("length"))
            parts.append(unit_dots(x, v[UPDATE], step, means))
            r_parts.append(reward_dots(x, v[UPDATE], v[REWARD], v.get(BONUS), step, r_means))
        return UnitDots.cat(parts), RewardDots.cat(r_parts)

    def _warn_degenerate(self, adv: torch.Tensor, state: AdamWState, n_units: int) -> None:
        if bool((adv == 0).all()):
            self.warnings.append("every advantage is zero (all rewards equal within each "
                                 "prompt): the gradient term is 0 and Δθ is momentum and "
                                 "weight decay only")
        if bool((state.lr == 0).all()):
            self.warnings.append("lr is 0 (end of a decayed schedule): every change is zero; "
                                 "set optimizer_overrides.lr to probe another step size")
        if n_units < MIN_UNITS_FOR_JACKKNIFE:
            self.warnings.append("fewer than 3 units: the jackknife SE is undefined (null)")

    def _realized(self, forcer: TeacherForcer, plan: _Plan, stats: SequenceStats,
                  swap: ParameterSwap, result: _StepResult) -> RealizedOutcome:
        """Phase 4: S⁺ (and f⁺) at θ + sΔθ on the measured sequences (the batch's own, or the
        E batch's) for each multiplier, SNIS, and the curvature ΔH(s) − s·δH₁ paired per unit."""
        spec, step = self.spec.realized, result.step
        chunks = [c for u in self._local(plan.layout).chunks(self.spec.microbatch_size)
                  for c in u]
        mine = sum(map(len, chunks))
        shape = (plan.batch.num_prompts, plan.batch.group_size)
        full = self.spec.entropy.estimator == "full_vocabulary"
        length = (stats.length if self.spec.entropy.normalization == "token_mean"
                  else torch.ones_like(stats.length)).double().view(shape)
        before = EntropySample(value=stats.entropy.double().view(shape), length=length,
                               log_weight=torch.zeros(shape, dtype=torch.float64))
        rows, samples = [], []
        on_chunk = self._counter(len(chunks) * len(spec.lr_multipliers))
        try:
            for mult in spec.lr_multipliers:
                swap.apply(step.delta, mult)
                values = sequence_values(forcer, chunks, full, on_chunk=lambda *_: on_chunk())
                self.passes.forward_no_grad += mine
                swap.restore()
                values = self._gather_values(values)
                s_after = values.logprob.double().view(shape)
                after = EntropySample(
                    value=values.entropy.double().view(shape) if full else -s_after,
                    length=length, log_weight=s_after - stats.logprob.double().view(shape))
                samples.append(after)
                est = snis(before, after, spec.normalization, spec.psis, plan.rewards)
                est.curvature = curvature(est, mult, result.estimate)
                rows.append((mult, est))
        finally:
            swap.restore()
        h0, h0_se = entropy_before(before)
        main = next((k for k, m in enumerate(spec.lr_multipliers) if m == 1.0), 0)
        return RealizedOutcome(h_before=h0, h_before_se=h0_se, normalization=spec.normalization,
                               ess_threshold=spec.ess_threshold, by_multiplier=rows,
                               noise_floor=self._noise_floor(forcer, stats.logprob),
                               per_prompt_h_before=per_prompt_entropy(before),
                               per_prompt_delta_h=per_prompt_change(before, samples[main]),
                               target="held_out" if self.spec.entropy_batch
                               else "batch_in_sample")

    def _gather_values(self, values: SequenceValues) -> SequenceValues:
        """Every sequence's S⁺ (and f⁺): each shard filled its own rows, the others are 0."""
        if self.comm.size == 1:
            return values
        named = {"logprob": values.logprob}
        if values.entropy is not None:
            named["entropy"] = values.entropy
        total = self.comm.exchange("sum", named)
        return SequenceValues(logprob=total["logprob"], entropy=total.get("entropy"))

    def _noise_floor(self, forcer: TeacherForcer, s: torch.Tensor) -> float:
        """max |S − S'| over a few sequences, S from the gradient forward and S' recomputed
        without grad in another chunking (on the first shard only: only its result is kept)."""
        if self.comm.rank != 0:
            return 0.0
        n = min(NOISE_CHECK_SEQUENCES, s.numel())
        size = 1 if self.spec.microbatch_size > 1 else 2
        alt = all_logprobs_subset(forcer, torch.arange(n), size)
        self.passes.noise_check_forward += n
        return float((alt - s[:n]).abs().max())

    def _outcome(self, ck: LoadedCheckpoint, plan: _Plan, measured: _Measured,
                 result: _StepResult, realized: RealizedOutcome | None, grad_method: str,
                 held_out: _Plan | None) -> ProbeOutcome:
        batch, adv, step = plan.batch, plan.update.advantages, result.step
        b, g = batch.num_prompts, batch.group_size
        first = ck.states[0]
        lr = float(result.state.lr[0]) if result.state.lr.numel() else first.lr
        optimizer = OptimizerOutcome(
            lr=lr, betas=(first.beta1, first.beta2), eps=first.eps,
            weight_decay=first.weight_decay, step=int(first.step), grad_norm=step.grad_norm,
            clip_factor=step.kappa, param_groups=len({st.group for st in ck.states}))
        summary = BatchOutcome(
            num_prompts=b, responses_per_prompt=g,
            mean_response_tokens=float(batch.lengths.double().mean()),
            reward_mean=float(plan.rewards.mean()),
            zero_advantage_prompts=int((adv == 0).all(1).sum()),
            on_policy_z=self._on_policy_check(plan, measured.stats))
        for phase in PHASES:
            self.timing.setdefault(phase, 0.0)
        # [U, P] unit vectors are kept for library callers of a one-worker probe only
        x, y = (unit_vectors(measured.shard, measured.scalars)
                if measured.shard.vectors is not None and self.comm.size == 1 else (None, None))
        passes, warnings = self._job_bookkeeping()
        entropy = EntropyOutcome(normalization=self.spec.entropy.normalization,
                                 estimator=self.spec.entropy.estimator,
                                 temperature=self.spec.generation.temperature)
        return ProbeOutcome(
            delta_h1=result.estimate, mode=self.estimator.mode,
            units=(held_out or plan).layout.num_units,
            entropy_batch=None if held_out is None else EntropyBatchOutcome(
                num_prompts=held_out.batch.num_prompts,
                responses_per_prompt=held_out.batch.group_size,
                mean_response_tokens=float(held_out.batch.lengths.double().mean())),
            entropy=entropy, realized=realized, batch=summary,
            proxy=covariance_proxy(measured.stats.logprob.view(b, g), adv), proxy_lr=lr,
            optimizer=optimizer, passes=passes, timing=self.timing, memory=self.tracer,
            device=str(self.device), updated_adapter=result.updated_adapter,
            grad_method=grad_method, base_reused=ck.base_reused, warnings=warnings,
            per_prompt=self._per_prompt(held_out or plan, result, realized),
            reward=result.reward, step=step,
            x_bar=result.means.x_bar, y_bar=result.means.y_bar, unit_x=x, unit_y=y,
            sequences=measured.stats)

    def _on_policy_check(self, plan: _Plan, stats: SequenceStats) -> float | None:
        """entropy.on_policy_z of the main batch (it needs the full-vocabulary f), and a warning
        when the client's rollouts do not look sampled from this policy."""
        if plan.summaries.spec.estimator != "full_vocabulary":
            return None
        z = on_policy_z(stats)
        if z is not None and abs(z) > OFF_POLICY_Z and self.spec.rollouts is not None:
            t = self.spec.generation.temperature
            self.warnings.append(OFF_POLICY_WARNING.format(
                s=float(stats.logprob.double().mean()), f=float(stats.entropy.double().mean()),
                z=z, n=stats.logprob.numel(), t=t))
        return z

    def _job_bookkeeping(self) -> tuple[Passes, list[str]]:
        """The passes of every shard, summed, and their warnings, each once (a job over several
        workers reports its whole work; timing and memory stay this shard's)."""
        parts = self.comm.exchange("gather", (self.passes, self.warnings))
        total = Passes(**{f.name: sum(getattr(p, f.name) for p, _ in parts)
                          for f in dataclasses.fields(Passes)})
        return total, list(dict.fromkeys(w for _, ws in parts for w in ws))

    def _per_prompt(self, plan: _Plan, result: _StepResult, realized: RealizedOutcome | None
                    ) -> PerPromptView | None:
        if not self.spec.report.per_prompt:
            return None
        layout = plan.layout
        unit_of = torch.empty(plan.batch.num_prompts, dtype=torch.long)
        for u, prompts in enumerate(layout.prompts):
            unit_of[prompts] = u
        return PerPromptView(
            unit=unit_of, delta_h1=result.estimate.per_unit[unit_of],
            h_before=realized.per_prompt_h_before if realized else None,
            delta_h=realized.per_prompt_delta_h if realized else None)


def check_finite(estimate: DeltaH1, state: AdamWState) -> None:
    """A δH₁ that is not a number is an error, not a result: clamped, it would read as a real
    estimate. NaN or inf moments in the optimizer state are the checkpoint's fault."""
    if math.isfinite(estimate.total):
        return
    if not state.moments_finite():
        raise CheckpointInvalid(
            f"δH₁ came out {estimate.total}: the optimizer state's moments (exp_avg / "
            "exp_avg_sq) hold NaN or inf values; the checkpoint's optimizer.pt is damaged "
            "(probe an earlier checkpoint or pass another optimizer file)", phase="step")
    raise InvalidRequest(
        f"δH₁ came out {estimate.total}: the step overflowed the model's precision; scale the "
        "rewards or the lr down, raise length_norm_constant, or check the optimizer state's "
        "lr/eps", phase="step")
