"""One job over several workers, in probe_core: k shards (threads here, worker processes or Ray
actors in the service) exchanging through probe_core/sharding.py give the numbers of one probe
over the whole batch.

- client rollouts (20 prompts drawn from a pool of 40, exact and blocks): every number of the
  outcome within rel 1e-5 of the one-shard probe, for 2 and 3 shards;
- sampled prompts: the same responses (token ids) whatever the split;
- the split refuses batch-level objectives and too-small batches.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from probe_core.checkpoint import ModelCache
from probe_core.errors import InvalidRequest
from probe_core.probe import ProbeHooks, run_probe
from probe_core.rollouts import batch_for
from probe_core.sharding import shard_bounds, shard_spec, sums_only
from probe_core.spec import (CheckpointSpec, ClientRollout, EstimatorSpec, GenerationSpec,
                             ObjectiveSpec, ProbeSpec, RealizedSpec, RuntimeOptions)
from probe_core.stages import reduce_gradients
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

REL = 1e-5
POOL = 40


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt")), TinyConfig(train_steps=2))


def rollouts(n: int, seed: int = 0) -> list[ClientRollout]:
    """n prompts drawn without replacement from a pool of 40, 4 responses with rewards."""
    rng = random.Random(seed)
    pool = [(f"{a}+{b}=", str(a + b)) for a in range(8) for b in range(5)][:POOL]
    out = []
    for prompt, answer in rng.sample(pool, n):
        responses = [answer, str(rng.randint(0, 9)), f"{answer} ?", "#" * rng.randint(1, 3)]
        out.append(ClientRollout(prompt, responses, [rng.random() for _ in responses]))
    return out


class ThreadExchange:
    """The coordinator of k shards running in threads of this process."""

    def __init__(self, k: int):
        self.k, self.barrier = k, threading.Barrier(k, timeout=120)
        self.slots: list = [None] * k

    def view(self, index: int):
        exchange = self

        class View:
            def means(self, shard, wait):
                return reduce_gradients(exchange.round(index, sums_only(shard)))

            def gather(self, part, wait):
                return exchange.round(index, part)

        return View()

    def round(self, index: int, payload) -> list:
        self.slots[index] = payload
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()                 # nobody overwrites a slot before all have read
        return out


def sharded(spec: ProbeSpec, k: int):
    """run_probe over k shards in threads; the lead shard's outcome."""
    exchange, bounds = ThreadExchange(k), shard_bounds(spec, k)
    outcomes, errors = [None] * k, []

    def shard(i: int) -> None:
        try:
            hooks = ProbeHooks(exchange=exchange.view(i))
            outcomes[i] = run_probe(shard_spec(spec, *bounds[i], lead=i == 0),
                                    RuntimeOptions(device="cpu"), ModelCache(), hooks)
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
            exchange.barrier.abort()

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return outcomes[0]


def numbers(out) -> dict[str, float]:
    d, u, r = out.delta_h1, out.delta_h1.u_statistic, out.realized
    _, main = r.main
    return {"total": d.total, "se": d.se, "gradient": d.gradient_term,
            "momentum": d.momentum_term, "decay": d.weight_decay_term, "u": u.value,
            "bars": u.bars_dot, "diag": u.diag_sum, "se_plugin": u.se_plugin,
            "delta_h": main.delta_h, "delta_h_se": main.se, "h_before": r.h_before,
            "ess": main.ess, "grad_norm": out.optimizer.grad_norm,
            "proxy": out.proxy.value, "reward_mean": out.batch.reward_mean,
            "tokens": out.batch.mean_response_tokens,
            **{f"dh_{s}": e.delta_h for s, e in r.by_multiplier}}


def client_spec(ckpt, mode: str = "exact") -> ProbeSpec:
    base, adapter = ckpt
    return ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts(20),
                     responses_per_prompt=4, reward_kind="provided",
                     estimator=EstimatorSpec(mode=mode, block_size=2),
                     realized=RealizedSpec(lr_multipliers=[1.0, 0.5]), microbatch_size=3)


@pytest.mark.parametrize("mode,k", [("exact", 2), ("exact", 3), ("blocks", 2)])
def test_client_rollouts_over_k_shards_equal_one_probe(ckpt, mode, k):
    spec = client_spec(ckpt, mode)
    one = run_probe(spec, RuntimeOptions(device="cpu"), ModelCache())
    many = sharded(spec, k)
    assert many.units == one.units and many.batch.num_prompts == 20
    a, b = numbers(one), numbers(many)
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=REL, abs=1e-12), name
    assert many.passes.forward_grad == one.passes.forward_grad


def test_sampled_responses_do_not_depend_on_the_split(ckpt):
    base, adapter = ckpt
    prompts = [f"{a}+{b}=" for a in range(4) for b in range(3)]
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), prompts=prompts,
                     answers=["1"] * len(prompts), responses_per_prompt=3,
                     generation=GenerationSpec(max_new_tokens=6, batch_size=6), seed=7)
    cache = ModelCache()
    from probe_core.checkpoint import open_checkpoint
    with open_checkpoint(spec.checkpoint, RuntimeOptions(device="cpu"), torch.device("cpu"),
                         cache) as ck:
        def texts(s: ProbeSpec) -> list[str]:
            return batch_for(s, ck, torch.device("cpu"))[0].response_texts

        whole = texts(spec)
        for k in (2, 3):
            parts = [texts(shard_spec(spec, a, b, lead=False)) for a, b in shard_bounds(spec, k)]
            assert [t for p in parts for t in p] == whole, k
    assert len(set(whole)) > 3                        # real sampling, not one repeated answer


def test_the_split_refuses_what_it_cannot_shard(ckpt):
    spec = client_spec(ckpt)
    with pytest.raises(InvalidRequest, match="token_mean"):
        shard_bounds(ProbeSpec(**{**spec.__dict__,
                                  "objective": ObjectiveSpec(length_norm="token_mean")}), 2)
    with pytest.raises(InvalidRequest, match="cannot be split over 11 workers"):
        shard_bounds(spec, 11)
    assert shard_bounds(spec, 3) == [(0, 7), (7, 13), (13, 20)]
