"""The E batch of two-batch mode (issue 14): held-out prompts sampled from the checkpoint's
policy, whose entropy gradient X_u is dotted with the U batch's step as each unit is computed.

Δθ is known before the E batch's gradient pass, so no E unit vector is kept: per unit, X_u is
formed on the device, dotted with the step's vectors and dropped. Memory stays flat in B_E; only
Σ X_u (one [P] vector, for the unconditional SE) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from probe_core.adamw import AdamWStep
from probe_core.estimators import UnitDots, UnitLayout, UnitMeans, unit_dots
from probe_core.gradients import GradientAccumulator
from probe_core.objective import Coefficients
from probe_core.rollouts import SamplingPlan
from probe_core.spec import ProbeSpec

# the E batch's sampling seed is offset from the U batch's, so that the two batches never
# share a response when they share a prompt
HELD_OUT_SEED_OFFSET = 1_000_003


def held_out_plan(spec: ProbeSpec) -> SamplingPlan:
    """What to sample for the E batch: G_E responses per held-out prompt."""
    e = spec.entropy_batch
    prompts = e.prompts[:e.num_prompts] if e.num_prompts else e.prompts
    return SamplingPlan(prompts, spec.prompt_format, e.responses_per_prompt, spec.generation,
                        spec.seed + HELD_OUT_SEED_OFFSET)


def entropy_coefficients(s: torch.Tensor, group_size: int) -> Coefficients:
    """c^X of the E sequences, c^Y = 0 (the E batch takes no part in the step).

    The baseline of sequence i must not depend on i itself. With G_E ≥ 2 it is the
    leave-one-out mean S̄_{n,−g} of the prompt's other responses (as in the U batch); with
    G_E = 1 there is no group, and it is the leave-one-out mean over the other E sequences (other
    prompts, drawn independently): still unbiased, E[X_u] = −∇H_u.

    Args: s: S of the E sequences [N_E]. Returns Coefficients with advantages of zeros.
    """
    s = s.double()
    groups = s.view(-1, group_size) if group_size > 1 else s.view(1, -1)     # [B_E, G_E] | [1, N]
    size = groups.shape[1]
    loo = (groups.sum(1, keepdim=True) - groups) / (size - 1)
    c_x = ((groups - loo) / size).reshape(-1)
    if group_size == 1:
        # X_u = c_u ∇S_u: the group mean of the U batch's form is over the E batch, but a unit
        # is one sequence, so the 1/G factor of the group average is 1 here
        c_x = c_x * size
    return Coefficients(c_x=c_x, c_y=torch.zeros_like(c_x),
                        advantages=torch.zeros(s.numel() // group_size, group_size,
                                               dtype=torch.float64))


@dataclass
class HeldOutDots:
    """The E batch's gradient pass against the U step.

    Fields: dots: UnitDots of the E units against Ȳ_U (x_ybar = X_u·WȲ_U), [U_E] each;
    x_sum: Σ_u X_u over the E units, float64 [P]; forward_grad, backward: pass counts."""

    dots: UnitDots
    x_sum: torch.Tensor
    forward_grad: int
    backward: int


def map_held_out_dots(acc: GradientAccumulator, layout: UnitLayout, microbatch: int,
                      coefs: Coefficients, step: AdamWStep, u_means: UnitMeans,
                      on_chunk: Callable[[], None] | None = None) -> HeldOutDots:
    """Per E unit: X_u on the device, its dots with the step, then dropped."""
    numel = acc.flat.numel
    x_sum = torch.zeros(numel, dtype=torch.float64, device=acc.forcer.device)    # [P]
    no_y = torch.zeros(1, numel)
    parts, forward, backward = [], 0, 0
    for chunks in layout.chunks(microbatch):
        grad = acc.unit(chunks, coefs.c_x, coefs.c_y, on_chunk=on_chunk)
        forward, backward = forward + grad.forward_grad, backward + grad.backward
        x_sum += grad.x
        parts.append(unit_dots(grad.x.cpu()[None], no_y, step, u_means))
    return HeldOutDots(dots=UnitDots.cat(parts), x_sum=x_sum.cpu(), forward_grad=forward,
                       backward=backward)
