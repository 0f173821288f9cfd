"""The memory trace is in every result, and an out-of-memory failure is clean.

- every probe result carries a trace point per phase (host RSS always; device fields null on
  CPU), and the peaks;
- a (simulated) out-of-memory error raises ProbeOutOfMemory with the phase and the trace so far,
  and the next probe on the same ModelCache reuses the base and gives the same numbers as a probe
  that never failed (the adapter was unloaded cleanly).
"""

from __future__ import annotations

import random

import pytest
import torch

from probe_core.checkpoint import ModelCache
from probe_core.errors import ProbeOutOfMemory
from probe_core.probe import PHASES, run_probe
from probe_core.spec import (CheckpointSpec, ClientRollout, GenerationSpec, ProbeSpec,
                             RealizedSpec, RuntimeOptions)
from faults import fault_hooks
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

G = 4


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> ProbeSpec:
    base, adapter = write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")),
                                          TinyConfig(train_steps=2))
    rng = random.Random(0)
    rollouts = [ClientRollout(f"{n}+{n}=", [[rng.randrange(2, 40) for _ in range(1 + (n + g) % 6)]
                                            for g in range(G)],
                              [float(rng.random() < 0.5) for _ in range(G)]) for n in range(4)]
    return ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts,
                     responses_per_prompt=G, reward_kind="provided",
                     generation=GenerationSpec(max_new_tokens=6),
                     realized=RealizedSpec(lr_multipliers=[1.0, 2.0]), microbatch_size=3)


def _lora_modules(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if "lora_" in n]


def test_every_result_has_a_trace_per_phase(spec):
    out = run_probe(spec, RuntimeOptions(device="cpu"))
    mem = out.memory
    assert [p.phase for p in mem.trace] == list(PHASES)
    assert all(p.host_rss_bytes > 0 for p in mem.trace)
    assert all(p.device_allocated_bytes is None and p.device_peak_bytes is None and
               p.device_reserved_bytes is None for p in mem.trace)       # CPU: no device fields
    assert [p.t for p in mem.trace] == sorted(p.t for p in mem.trace)
    assert mem.peak_host_rss_bytes >= max(p.host_rss_bytes for p in mem.trace)
    assert mem.peak_device_bytes is None
    assert set(PHASES) | {"total"} <= set(out.timing)


def test_trace_reaches_the_wire_result(spec):
    pytest.importorskip("pydantic")
    from service.mapping import to_result

    result = to_result(run_probe(spec, RuntimeOptions(device="cpu")))
    assert [p.phase for p in result.memory.trace] == list(PHASES)
    assert result.memory.peak_host_rss_bytes > 0
    assert result.memory.peak_device_bytes is None


@pytest.mark.parametrize("phase", ["teacher_forcing", "gradients", "realized"])
def test_out_of_memory_fails_cleanly_and_the_next_probe_succeeds(spec, phase):
    cache = ModelCache()
    reference = run_probe(spec, RuntimeOptions(device="cpu"), cache)
    with pytest.raises(ProbeOutOfMemory) as info:
        run_probe(spec, RuntimeOptions(device="cpu"), cache, fault_hooks(f"oom:{phase}"))
    err = info.value
    assert err.phase == phase and err.code == "out_of_memory"
    done = list(PHASES[:PHASES.index(phase)])
    assert [p.phase for p in err.trace] == done and done
    assert "microbatch" in err.message
    assert _lora_modules(cache.model) == []          # the adapter is off the cached base
    after = run_probe(spec, RuntimeOptions(device="cpu"), cache)
    assert after.base_reused and cache.loads == 1
    assert after.delta_h1.total == reference.delta_h1.total
    assert after.realized.main[1].delta_h == reference.realized.main[1].delta_h
    assert [p.phase for p in after.memory.trace] == list(PHASES)
