"""The E batch of two-batch mode (issue 14): held-out prompts sampled from the checkpoint's
policy, whose entropy gradient X_u is dotted with the U batch's step as each unit is computed.

Δθ is known before the E batch's gradient pass, so no E unit vector is kept: per unit, its
accumulator rows (summaries.py) are dotted with the step's four vectors and dropped. Memory
stays flat in B_E; only the unit sums of the rows ([P] each) are kept, for X̄_E.

Baselines. With G_E ≥ 2 each prompt's responses baseline each other (SummaryPlan.combine, as
in the U batch). With G_E = 1 there is no group: the baseline of sequence u is the leave-one-out
mean over the *other* E sequences (other prompts, drawn independently, so still independent of
sequence u and E[X_u] = −∇H_u), applied once the whole E batch is known:
    sampled          X^seq_u = b_u∇S_u − b̄_{−u}∇S_u                      (b = S)
    full_vocabulary  X^seq_u = −(∇F_u − b̄_{−u}∇S_u)                      (b = m)
    token_mean       N_u = T_u∇S_u − T̄_{−u}∇S_u,   X_u = (X^seq_u + Ĥ_tok N_u)/Ê[T].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from probe_core.adamw import AdamWStep
from probe_core.entropy import EntropyScalars, SequenceStats, batch_scalars
from probe_core.estimators import BilinearDots, UnitDots, UnitLayout
from probe_core.gradients import GradientAccumulator
from probe_core.rollouts import SamplingPlan
from probe_core.spec import EntropySpec, ProbeSpec
from probe_core.stages import reduce_stats
from probe_core.summaries import UPDATE, SummaryPlan

# the E batch's sampling seed is offset from the U batch's, so that the two batches never
# share a response when they share a prompt
HELD_OUT_SEED_OFFSET = 1_000_003


def held_out_plan(spec: ProbeSpec) -> SamplingPlan:
    """What to sample for the E batch: G_E responses per held-out prompt."""
    e = spec.entropy_batch
    prompts = e.prompts[:e.num_prompts] if e.num_prompts else e.prompts
    return SamplingPlan(prompts, spec.prompt_format, e.responses_per_prompt, spec.generation,
                        spec.seed + HELD_OUT_SEED_OFFSET)


class SingleResponsePlan(SummaryPlan):
    """The E batch's rows with G_E = 1: combine keeps the unit's raw rows by name (ones ∇S,
    baseline b∇S, length T∇S for token_mean, pathwise ∇F for full_vocabulary), because the
    leave-one-out baseline over the other E sequences needs the whole batch."""

    def combine(self, logprob_sums, pathwise_sums, stats, prompt_weight, bonus_sums=None
                ) -> dict[str, torch.Tensor]:
        rows = logprob_sums[0]                                                  # [K, P]
        raw = {"ones": rows[0], "baseline": rows[1]}
        if self.token_mean:
            raw["length"] = rows[2]
        if self.pathwise:
            raw["pathwise"] = pathwise_sums[0]
        return raw


def held_out_summaries(spec: EntropySpec, num_sequences: int, group_size: int) -> SummaryPlan:
    """The E batch's accumulator rows (its update weight is 0: it takes no part in the step)."""
    direct = {UPDATE: torch.zeros(num_sequences, dtype=torch.float64)}
    cls = SingleResponsePlan if group_size == 1 else SummaryPlan
    return cls(spec, direct, group_size)


def _single_response_x(rows: dict[str, torch.Tensor], b_total: float, t_total: float,
                       n: int, scalars: EntropyScalars, plan: SummaryPlan) -> torch.Tensor:
    """X of G_E = 1 units from their raw rows, with the leave-one-out baseline over the other
    n − 1 E sequences. A unit is one sequence, so its baseline row is b_u·(its ones row) and
    Σ_{v≠u} b_v·∇S_u = b_total·ones − baseline: X is linear in the rows with batch scalars
    only, and this serves per-unit dots (rows [U, D]) and their sums over units (rows [D])."""
    loo = (b_total * rows["ones"] - rows["baseline"]) / (n - 1)
    x = -(rows["pathwise"] - loo) if plan.pathwise else rows["baseline"] - loo
    length = None
    if plan.token_mean:
        length = rows["length"] - (t_total * rows["ones"] - rows["length"]) / (n - 1)
    return scalars.entropy_vector(x, length)


@dataclass
class HeldOutRows:
    """The E batch's gradient pass over some units against the U step (a map output).

    Fields: rows: per accumulator row, each unit's dots with the step's four vectors, float64
    [U_s, 4] host; sums: per row, Σ over the shard's units, float64 [P] host; stats: the shard's
    sequences' statistics (host) and sequences their batch indices [N_s]; forward_grad, backward:
    pass counts."""

    rows: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor]
    stats: SequenceStats
    sequences: torch.Tensor
    forward_grad: int
    backward: int


@dataclass
class HeldOutDots:
    """The E batch against the U step (the reduce of every shard's HeldOutRows).

    Fields: dots: UnitDots of the E units against Ȳ_U (x_ybar = X_u·WȲ_U; diag and xbar_y are
    0: two_batch needs no same-unit term), [U_E] each; x_bar: X̄_E, float64 [P] host; stats: the
    E sequences' statistics (host, batch order)."""

    dots: UnitDots
    x_bar: torch.Tensor
    stats: SequenceStats


def map_held_out_rows(acc: GradientAccumulator, layout: UnitLayout, plan: SummaryPlan,
                      microbatch: int, step: AdamWStep, y_bar: torch.Tensor,
                      on_chunk: Callable[[], None] | None = None) -> HeldOutRows:
    """Per E unit of `layout` (a shard's): its rows on the device, dotted with the step's four
    vectors (W⊙Ȳ_U, D⊙Ȳ_U, lr β1 D⊙m, lr wd θ), then dropped; the rows' unit sums are kept
    for X̄_E.

    Args: y_bar: Ȳ of the U batch, float64 [P]."""
    dev = acc.forcer.device
    vectors = torch.stack([step.w_grad * y_bar, step.d * y_bar, step.w_momentum,
                           step.w_decay]).to(dev, torch.float64).T               # [P, 4]
    dots: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, torch.Tensor] = {}
    stats, forward, backward = [], 0, 0
    for u, chunks in enumerate(layout.chunks(microbatch)):
        grad = acc.unit(chunks, plan, layout.prompt_weight[layout.prompts[u]], on_chunk)
        forward, backward = forward + grad.forward_grad, backward + grad.backward
        stats.append(grad.stats)
        rows = grad.summary if isinstance(grad.summary, dict) else {
            "entropy": grad.summary.entropy, "length": grad.summary.length}
        for name, v in rows.items():
            if v is None:
                continue
            dots.setdefault(name, []).append((v.double() @ vectors).cpu())        # [4]
            if name not in sums:
                sums[name] = torch.zeros_like(v, dtype=torch.float64)
            sums[name].add_(v)                                        # in place: no [P] per unit
    sequences = torch.cat([layout.sequences(u) for u in range(layout.num_units)])
    return HeldOutRows(rows={name: torch.stack(d) for name, d in dots.items()},
                       sums={name: v.cpu() for name, v in sums.items()},
                       stats=SequenceStats.cat(stats).cpu(), sequences=sequences,
                       forward_grad=forward, backward=backward)


def reduce_held_out(shards: list[HeldOutRows], sums: dict[str, torch.Tensor], num_units: int,
                    plan: SummaryPlan) -> HeldOutDots:
    """The E units' dots and X̄_E from every shard's rows (in unit order) and the rows' sums
    over all units (`sums`, reduced across shards)."""
    n = sum(s.sequences.numel() for s in shards)
    stats = reduce_stats(shards, n)
    scalars = batch_scalars(stats, plan.spec)
    unit_rows = {name: torch.cat([s.rows[name] for s in shards]) for name in shards[0].rows}
    if isinstance(plan, SingleResponsePlan):
        b_total, t_total = float(stats.baseline.double().sum()), float(stats.length.sum())
        x = _single_response_x(unit_rows, b_total, t_total, n, scalars, plan)    # [U, 4]
        x_bar = _single_response_x(sums, b_total, t_total, n, scalars, plan) / n
    else:   # G_E ≥ 2: the rows already hold X^seq_u (and N_u), baselined within each prompt
        x = scalars.entropy_vector(unit_rows["entropy"], unit_rows.get("length"))
        x_bar = scalars.entropy_vector(sums["entropy"], sums.get("length")) / num_units
    zero = torch.zeros(num_units, dtype=torch.float64)
    return HeldOutDots(
        dots=UnitDots(preconditioned=BilinearDots(diag=zero, x_ybar=x[:, 1], xbar_y=zero),
                      step_weighted=BilinearDots(diag=zero, x_ybar=x[:, 0], xbar_y=zero),
                      momentum=x[:, 2].contiguous(), decay=x[:, 3].contiguous()),
        x_bar=x_bar, stats=stats)
