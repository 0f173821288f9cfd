"""Test-only fault injection: nothing here is on the production path.

A fault `kind:phase` acts when a probe enters `phase` (its first progress call there):
`oom` raises the CUDA out-of-memory error torch raises, `hang` sleeps past any deadline without
reaching a chunk boundary. In a server it applies only to jobs whose seed is FAULT_SEED, so the
other jobs of the same server run normally; `kind:phase@r` only to shard r of such a job
(request `workers` ≥ 2: the other shards run normally), and to every shard of a job whose seed
is EVERY_SHARD_SEED.
"""

from __future__ import annotations

import functools
import time

from probe_core.probe import ProbeHooks

FAULT_SEED = 424242
EVERY_SHARD_SEED = FAULT_SEED + 1
HANG_S = 3600.0


def fault_hooks(fault: str, hooks: ProbeHooks | None = None) -> ProbeHooks:
    """`hooks` (or none) with the fault injected at its phase."""
    kind, phase = fault.split(":")
    if kind not in ("oom", "hang"):
        raise ValueError(f"unknown fault kind {kind!r}")
    hooks = hooks or ProbeHooks()
    inner = hooks.progress

    def progress(at: str, done: int, total: int) -> None:
        if at == phase and kind == "oom":
            import torch
            raise torch.cuda.OutOfMemoryError(f"simulated out of memory in {phase}")
        if inner is not None:
            inner(at, done, total)
        if at == phase and kind == "hang":      # reported the phase, then no boundary
            time.sleep(HANG_S)

    return ProbeHooks(progress, hooks.should_cancel, hooks.deadline)


def _wrap(fault: str, hooks: ProbeHooks, request, rank: int = 0) -> ProbeHooks:
    fault, _, only = fault.partition("@")
    hit = (request.seed == FAULT_SEED and (not only or int(only) == rank)
           or bool(only) and request.seed == EVERY_SHARD_SEED)
    return fault_hooks(fault, hooks) if hit else hooks


def worker_main(fault: str, *args) -> None:
    """The worker process's entry point with `fault` injected (picklable for 'spawn')."""
    from service import worker
    worker.main(*args, wrap_hooks=functools.partial(_wrap, fault))
