"""The map and reduce pieces of a probe, as functions of small picklable dataclasses.

A job's units can be computed by several workers (issue 16) and reduced:
    map     gradients over a shard of units      → GradientShard  (map_gradients)
    reduce  Σ of the shards' P-vectors            → UnitMeans      (reduce_gradients)
            D, Δθ once                            → AdamWStep      (adamw.adamw_step)
    map     unit dots for the step                → UnitDots       (map_unit_dots)
    reduce  U-statistic, SEs                      → DeltaH1        (Estimator.delta_h1 of
                                                                    UnitDots.cat(parts))
Today one process runs them all (probe.py), over one shard holding every unit. Everything a
map returns is host tensors and numbers, so it can cross a process or Ray boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from probe_core.adamw import AdamWStep
from probe_core.estimators import UnitDots, UnitMeans, unit_dots
from probe_core.gradients import GradientAccumulator
from probe_core.objective import Coefficients

BYTES_PER_FP32 = 4
UNIT_VECTORS_PER_UNIT = 2        # X_u and Y_u


@dataclass
class GradientShard:
    """The gradient pass over some units (a map output).

    Fields:
        unit_x, unit_y: X_u, Y_u, fp32 [U_s, P] on the host, or None when they exceed the host
            budget (then map_unit_dots cannot run and the units are recomputed)
        x_sum, y_sum: Σ_u X_u, Σ_u Y_u over the shard's units, float64 [P] on the host
        units: U_s, the number of units in the shard
        forward_grad, backward: sequences through each pass kind
    """

    unit_x: torch.Tensor | None
    unit_y: torch.Tensor | None
    x_sum: torch.Tensor
    y_sum: torch.Tensor
    units: int
    forward_grad: int
    backward: int


def keeps_unit_vectors(units: int, numel: int, host_budget_bytes: int) -> bool:
    """Whether the X_u, Y_u of `units` units fit the host budget."""
    return UNIT_VECTORS_PER_UNIT * units * numel * BYTES_PER_FP32 <= host_budget_bytes


def map_gradients(acc: GradientAccumulator, unit_chunks: list[list[torch.Tensor]],
                  coefs: Coefficients, keep: bool, on_chunk: Callable[[], None] | None = None
                  ) -> GradientShard:
    """X_u, Y_u of every unit in `unit_chunks` (per unit, its chunks of sequence indices)."""
    n_units, numel = len(unit_chunks), acc.flat.numel
    unit_x = torch.empty(n_units, numel) if keep else None
    unit_y = torch.empty(n_units, numel) if keep else None
    # Σ_u X_u, Σ_u Y_u in float64 where the unit vectors are (the device): no per-unit host
    # arithmetic on [P] vectors while the device waits
    sums = torch.zeros(2, numel, dtype=torch.float64, device=acc.forcer.device)   # [2, P]
    forward = backward = 0
    for u, chunks in enumerate(unit_chunks):
        grad = acc.unit(chunks, coefs.c_x, coefs.c_y, on_chunk=on_chunk)
        forward, backward = forward + grad.forward_grad, backward + grad.backward
        sums[0] += grad.x
        sums[1] += grad.y
        if keep:
            unit_x[u].copy_(grad.x)
            unit_y[u].copy_(grad.y)
    x_sum, y_sum = sums.cpu()
    return GradientShard(unit_x=unit_x, unit_y=unit_y, x_sum=x_sum, y_sum=y_sum, units=n_units,
                         forward_grad=forward, backward=backward)


def reduce_gradients(shards: list[GradientShard]) -> UnitMeans:
    """X̄ and Ȳ over every unit of every shard."""
    units = sum(s.units for s in shards)
    return UnitMeans(x_bar=sum(s.x_sum for s in shards) / units,
                     y_bar=sum(s.y_sum for s in shards) / units)


def map_unit_dots(shard: GradientShard, step: AdamWStep, means: UnitMeans) -> UnitDots:
    """The shard's rows of the unit dots, from its kept unit vectors."""
    if shard.unit_x is None:
        raise ValueError("the shard kept no unit vectors: recompute them (probe.py)")
    return unit_dots(shard.unit_x, shard.unit_y, step, means)
