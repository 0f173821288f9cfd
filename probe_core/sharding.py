"""One job over several workers (issue 16): what a shard's probe exchanges with the others.

A job's prompts are split into contiguous shards, one per worker; each runs the whole pipeline
(probe.py) on its prompts, with two collective steps in between, provided by the worker that
runs it through ProbeHooks.exchange:
  - `means`: its GradientShard's Σ X_u, Σ Y_u go up, X̄ and Ȳ over every shard's units come back
    (stages.reduce_gradients on the coordinator; 2 P-vectors each way). Every shard then takes
    the same AdamW step from the same optimizer state: D and Δθ are equal everywhere;
  - `gather`: the per-unit dots (UnitDots) and the per-sequence numbers (BatchPart: S, S⁺,
    lengths, rewards, advantages) of every shard come back to every shard, in shard order, so
    the U-statistic, the SEs and SNIS are formed over the whole batch exactly as in one worker.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from probe_core.errors import InvalidRequest
from probe_core.estimators import UnitMeans
from probe_core.outcome import Passes
from probe_core.rollouts import prompts_per_call
from probe_core.spec import ProbeSpec
from probe_core.stages import GradientShard

MIN_UNITS_PER_SHARD = 2     # each shard's layout must be a valid batch of its own
# objective pieces that are batch scalars: a shard alone cannot form them
BATCH_LEVEL = {"advantage": ("batch_standardized",), "length_norm": ("token_mean",)}


class ShardExchange(Protocol):
    def means(self, shard: GradientShard, wait: Callable[[], None]) -> UnitMeans:
        """X̄, Ȳ over the units of every shard of the job. `wait()` is called while waiting (a
        chunk boundary: it raises on cancel or deadline)."""

    def gather(self, part, wait: Callable[[], None]) -> list:
        """Every shard's `part`, in shard order."""


@dataclass
class BatchPart:
    """What the realized change and the result need of a shard's sequences.

    Fields:
        s: S [N_k] fp32; lengths: response tokens [N_k] long; rewards, advantages [B_k, G]
        s_after: S⁺ [N_k, M] for the M lr multipliers, or None (realized disabled)
        noise_floor: max |S − S'| under another chunking, or None
        passes: the shard's sequences through each pass kind
    """

    s: torch.Tensor
    lengths: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    s_after: torch.Tensor | None
    noise_floor: float | None
    passes: Passes


def join(parts: list[BatchPart]) -> BatchPart:
    """The whole batch from its shards (in shard order)."""
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    floors = [p.noise_floor for p in parts if p.noise_floor is not None]
    passes = Passes(**{f.name: sum(getattr(p.passes, f.name) for p in parts)
                       for f in dataclasses.fields(Passes)})
    return BatchPart(s=cat("s"), lengths=cat("lengths"), rewards=cat("rewards"),
                     advantages=cat("advantages"), s_after=cat("s_after"),
                     noise_floor=max(floors) if floors else None, passes=passes)


def sums_only(shard: GradientShard) -> GradientShard:
    """The shard without its unit vectors: what crosses to the coordinator."""
    return dataclasses.replace(shard, unit_x=None, unit_y=None)


def job_prompts(spec: ProbeSpec) -> int:
    """B: the prompts (or client rollouts) the job probes."""
    n = len(spec.rollouts if spec.rollouts is not None else spec.prompts or [])
    return min(n, spec.num_prompts) if spec.num_prompts else n


def shard_bounds(spec: ProbeSpec, shards: int) -> list[tuple[int, int]]:
    """[start, stop) prompts of each of `shards` contiguous shards. They split on whole units
    (a block never straddles two shards) and on whole generate() calls (so each call samples
    the same prompts with the same seed whatever the split). Raises InvalidRequest when the
    batch is too small for that many shards or needs a batch-level objective."""
    for field, kinds in BATCH_LEVEL.items():
        if getattr(spec.objective, field) in kinds:
            raise InvalidRequest(f"objective.{field}={getattr(spec.objective, field)} is a batch "
                                 "quantity that a job split over workers cannot form yet; send "
                                 "workers: 1", phase="rollouts")
    b = job_prompts(spec)
    per_unit = spec.estimator.block_size if spec.estimator.mode == "blocks" else 1
    atom = math.lcm(per_unit, 1 if spec.rollouts is not None else
                    prompts_per_call(spec.generation, spec.responses_per_prompt))
    atoms = -(-b // atom)
    if atoms < shards or b // per_unit < MIN_UNITS_PER_SHARD * shards:
        raise InvalidRequest(
            f"{b} prompts cannot be split over {shards} workers with at least "
            f"{MIN_UNITS_PER_SHARD} units ({per_unit} prompt(s) each) and whole generate() calls "
            f"({atom} prompts) per worker; send more prompts or fewer workers", phase="rollouts")
    edges = [min(b, round(i * atoms / shards) * atom) for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def shard_spec(spec: ProbeSpec, start: int, stop: int, lead: bool) -> ProbeSpec:
    """The spec of prompts [start, stop) of the job; only the lead shard saves the adapter."""
    b = job_prompts(spec)
    rollouts = prompts = answers = None
    if spec.rollouts is not None:
        rollouts = spec.rollouts[:b][start:stop]
    else:
        prompts = spec.prompts[:b][start:stop]
        answers = spec.answers[:b][start:stop] if spec.answers is not None else None
    return dataclasses.replace(
        spec, rollouts=rollouts, prompts=prompts, answers=answers, num_prompts=None,
        first_prompt=start,
        save_updated_adapter_to=spec.save_updated_adapter_to if lead else None)
