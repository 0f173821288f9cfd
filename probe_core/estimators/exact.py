"""`exact` mode: a unit is one prompt; δH₁'s gradient term is the cross-unit U-statistic over
prompts, its SE the delete-one jackknife over prompts."""

from __future__ import annotations

from probe_core.errors import DegenerateBatch
from probe_core.estimators.base import UnitLayout, contiguous_layout
from probe_core.estimators.ustat import DeltaH1, UnitDots, cross_unit_delta_h1

MIN_UNITS = 2    # the U-statistic pairs different units


class ExactEstimator:
    mode = "exact"

    def layout(self, num_prompts: int, group_size: int) -> UnitLayout:
        if num_prompts < MIN_UNITS:
            raise DegenerateBatch(f"{num_prompts} prompts give fewer than {MIN_UNITS} units "
                                  f"(mode={self.mode}); δH₁ needs at least 2 independent units",
                                  phase="rollouts")
        return contiguous_layout(num_prompts, group_size, 1)

    def delta_h1(self, dots: UnitDots, kappa: float) -> DeltaH1:
        return cross_unit_delta_h1(dots, kappa)
