"""The estimator seam: what a unit is and how δH₁ and its SE are formed from the units.

An estimator mode is one module in this package holding one class with this interface, listed
in `estimators/__init__.py`'s MODES. The pipeline (probe.py) never branches on the mode:
  1. `layout` says which prompts form each unit (and so the weight of each prompt's gradient
     summary in its unit: a unit is the mean of its prompts), and refuses batches with too few;
  2. the gradient pass accumulates each unit's X_u, Y_u (gradients.py, any number of workers);
  3. `delta_h1` forms the estimate and its SE from the per-unit dots (estimators/ustat.py) once
     the step is known: a reduce over the concatenated dots of every shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from probe_core.estimators.ustat import DeltaH1, UnitDots


@dataclass
class UnitLayout:
    """Which prompts and sequences make up each unit.

    Fields:
        prompts: per unit, the prompt indices it averages (a list of [k] long tensors)
        prompt_weight: weight of each prompt's summary in its unit, float64 [B] (1/k: a unit
            is the mean of its prompts)
        group_size: G, responses per prompt (sequence i = n·G + g)
    """

    prompts: list[torch.Tensor]
    prompt_weight: torch.Tensor
    group_size: int

    @property
    def num_units(self) -> int:
        return len(self.prompts)

    def sequences(self, unit: int) -> torch.Tensor:
        """Sequence indices of one unit, [k·G] long, prompt by prompt."""
        g = self.group_size
        return (self.prompts[unit][:, None] * g + torch.arange(g)).reshape(-1)

    def sequence_weight(self) -> torch.Tensor:
        """The prompt weight of every sequence, float64 [B·G]."""
        return self.prompt_weight.repeat_interleave(self.group_size)

    def subset(self, units: range) -> UnitLayout:
        """The layout of some of the units (a shard's): prompt and sequence indices stay the
        batch's."""
        return UnitLayout([self.prompts[u] for u in units], self.prompt_weight, self.group_size)

    def chunks(self, microbatch: int) -> list[list[torch.Tensor]]:
        """Per unit, its sequences in chunks of ≤ microbatch; a chunk never spans two units,
        so every chunk's gradient belongs to exactly one unit."""
        return [list(self.sequences(u).split(microbatch)) for u in range(self.num_units)]


class Estimator(Protocol):
    """One estimator mode (`exact`, `blocks`, ...)."""

    mode: str

    def layout(self, num_prompts: int, group_size: int) -> UnitLayout:
        """The units of a batch of B prompts × G responses. Raises DegenerateBatch when the
        batch gives fewer units than the estimator needs."""

    def delta_h1(self, dots: UnitDots, kappa: float) -> DeltaH1:
        """δH₁, its terms and SE from the dots of every unit (in unit order) and the clip
        factor κ (held fixed)."""


def contiguous_layout(num_prompts: int, group_size: int, per_unit: int) -> UnitLayout:
    """Units of `per_unit` consecutive prompts each (num_prompts divisible by per_unit)."""
    prompts = list(torch.arange(num_prompts).split(per_unit))
    weight = torch.full((num_prompts,), 1.0 / per_unit, dtype=torch.float64)
    return UnitLayout(prompts=prompts, prompt_weight=weight, group_size=group_size)
