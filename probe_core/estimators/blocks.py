"""`blocks` mode: a unit is the mean of `block_size` consecutive prompts (fewer, less noisy
units); δH₁ is the same cross-unit U-statistic and jackknife, over blocks."""

from __future__ import annotations

from probe_core.errors import DegenerateBatch
from probe_core.estimators.base import UnitLayout, contiguous_layout
from probe_core.estimators.exact import MIN_UNITS
from probe_core.estimators.ustat import DeltaH1, UnitDots, cross_unit_delta_h1


class BlocksEstimator:
    mode = "blocks"

    def __init__(self, block_size: int):
        self.block_size = block_size

    def layout(self, num_prompts: int, group_size: int) -> UnitLayout:
        k = self.block_size
        if num_prompts % k or num_prompts // k < MIN_UNITS:
            raise DegenerateBatch(
                f"{num_prompts} prompts give fewer than {MIN_UNITS} units (mode=blocks, "
                f"block_size={k}); δH₁ needs at least 2 independent units (and B divisible "
                "by block_size)", phase="rollouts")
        return contiguous_layout(num_prompts, group_size, k)

    def delta_h1(self, dots: UnitDots, kappa: float) -> DeltaH1:
        return cross_unit_delta_h1(dots, kappa)
