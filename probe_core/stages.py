"""The map and reduce pieces of a probe, as functions of small picklable dataclasses.

A job's units can be computed by several workers (issue 16) and reduced:
    map     gradient pass over a shard of units     → GradientShard   (map_gradients)
    reduce  the batch's sequence statistics          → SequenceStats   (reduce_stats)
            batch scalars (token-mean ratio, Ê[T])   → EntropyScalars  (entropy.batch_scalars)
            Σ of the shards' P-vectors               → UnitMeans       (reduce_gradients)
            D, Δθ once                               → AdamWStep       (adamw.adamw_step)
    map     unit dots for the step                   → UnitDots        (map_unit_dots)
    reduce  U-statistic, SEs                         → DeltaH1         (Estimator.delta_h1 of
                                                                        UnitDots.cat(parts))
    map     S⁺ (and f⁺) at θ + sΔθ                   → SequenceValues  (teacher_forcing)
    reduce  SNIS                                     → importance.snis
One process runs them all over one shard holding every unit, or each of k workers maps its
block of units and the reduces run on the exchanged results (probe_core/collective.py).
Everything a map returns is host tensors and numbers, so it can cross a process or Ray
boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from probe_core.adamw import AdamWStep
from probe_core.entropy import EntropyScalars, SequenceStats
from probe_core.estimators import UnitDots, UnitLayout, UnitMeans, unit_dots
from probe_core.gradients import GradientAccumulator
from probe_core.summaries import UPDATE, SummaryPlan

BYTES_PER_FP32 = 4


@dataclass
class GradientShard:
    """The gradient pass over some units (a map output).

    Fields:
        vectors: per summary ("entropy" X^seq_u, "length" N_u for token_mean, "update" Y_u, …),
            fp32 [U_s, P] on the host; None when they exceed the host budget (then the units
            are recomputed for their dots)
        sums: per summary, Σ_u over the shard's units, float64 [P] on the host
        stats: the shard's sequences' SequenceStats (host), in the order of `sequences`
        sequences: their indices in the batch, [N_s] long
        units: U_s; forward_grad, backward: sequences through each pass kind
    """

    vectors: dict[str, torch.Tensor] | None
    sums: dict[str, torch.Tensor]
    stats: SequenceStats
    sequences: torch.Tensor
    units: int
    forward_grad: int
    backward: int


def keeps_unit_vectors(units: int, numel: int, summaries: int, host_budget_bytes: int) -> bool:
    """Whether `summaries` vectors of `units` units fit the host budget."""
    return summaries * units * numel * BYTES_PER_FP32 <= host_budget_bytes


def map_gradients(acc: GradientAccumulator, layout: UnitLayout, plan: SummaryPlan,
                  keep: bool, microbatch: int, on_chunk: Callable[[], None] | None = None
                  ) -> GradientShard:
    """The gradient summaries of every unit of `layout` (a shard's units)."""
    n_units, numel = layout.num_units, acc.flat.numel
    vectors, sums, stats, forward, backward = None, None, [], 0, 0
    for u, chunks in enumerate(layout.chunks(microbatch)):
        grad = acc.unit(chunks, plan, layout.prompt_weight[layout.prompts[u]], on_chunk)
        forward, backward = forward + grad.forward_grad, backward + grad.backward
        named = grad.summary.vectors()
        if sums is None:
            # Σ_u in float64 where the unit vectors are (the device): no per-unit host
            # arithmetic on [P] vectors while the device waits
            sums = {k: torch.zeros(numel, dtype=torch.float64, device=v.device)
                    for k, v in named.items()}
            if keep:
                vectors = {k: torch.empty(n_units, numel) for k in named}
        for k, v in named.items():
            sums[k] += v
            if keep:
                vectors[k][u].copy_(v)
        stats.append(grad.stats)
    sequences = torch.cat([layout.sequences(u) for u in range(n_units)])
    return GradientShard(vectors=vectors, sums={k: v.cpu() for k, v in sums.items()},
                         stats=SequenceStats.cat(stats).cpu(), sequences=sequences,
                         units=n_units, forward_grad=forward, backward=backward)


def reduce_stats(shards: list, num_sequences: int) -> SequenceStats:
    """Every sequence's statistics, in batch order, from shards (GradientShard, HeldOutRows:
    anything with `stats` and `sequences`) that together hold every sequence once."""
    stats = SequenceStats.cat([s.stats for s in shards])
    order = torch.empty(num_sequences, dtype=torch.long)
    order[torch.cat([s.sequences for s in shards])] = torch.arange(num_sequences)
    return stats.rows(order)


def reduce_gradients(shards: list[GradientShard], scalars: EntropyScalars) -> UnitMeans:
    """X̄ and Ȳ over every unit of every shard, the batch scalars applied."""
    units = sum(s.units for s in shards)
    total = {k: sum(s.sums[k] for s in shards) for k in shards[0].sums}
    x_sum = scalars.entropy_vector(total["entropy"].clone(), total.get("length"))
    return UnitMeans(x_bar=x_sum / units, y_bar=total[UPDATE] / units)


def unit_vectors(shard: GradientShard, scalars: EntropyScalars
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """X_u, Y_u [U_s, P] fp32 of a shard that kept its vectors. X is formed in place from
    X^seq_u and N_u (no second [U, P] copy) and replaces them under the name "x"."""
    v = shard.vectors
    if "x" not in v:
        v["x"] = scalars.entropy_vector(v.pop("entropy"), v.pop("length", None))
    return v["x"], v[UPDATE]


def map_unit_dots(shard: GradientShard, step: AdamWStep, means: UnitMeans,
                  scalars: EntropyScalars) -> UnitDots:
    """The shard's rows of the unit dots, from its kept unit vectors."""
    if shard.vectors is None:
        raise ValueError("the shard kept no unit vectors: recompute them (probe.py)")
    x, y = unit_vectors(shard, scalars)
    return unit_dots(x, y, step, means)
