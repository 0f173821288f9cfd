"""One probe job over k shards (issue 16, probe_core side): k = 2 and 3 shards in threads of one
process (probe_core.collective.ThreadGroup, the same exchanges the service's workers make over
their queues) give every number of the one-shard result, within float tolerance, in each of the
probe's paths: client rollouts and sampled prompts, exact and blocks units, both entropy kinds,
the entropy bonus, unit vectors over the host budget (recomputed per shard), two-batch mode with
G_E = 1 and 4. A shard that fails stops the others (no hang)."""

from __future__ import annotations

import math

import pytest

from probe_core.checkpoint import ModelCache
from probe_core.collective import SOLO, ThreadGroup, combine, shard_units
from probe_core.errors import DeadlineExceeded, ProbeCancelled
from probe_core.probe import ProbeHooks, run_probe
from probe_core.spec import (CheckpointSpec, ClientRollout, EntropyBatchSpec, EntropySpec,
                             EstimatorSpec, GenerationSpec, ObjectiveSpec, ProbeSpec,
                             RealizedSpec)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint
from service.mapping import to_result

G = 3
MAX_NEW = 5
PROMPTS = ["1+2=", "13+4=", "7-3=", "2+2=?", "9:3=", "5+5=", "8-1=", "2*3="]
ANSWERS = ["3", "17", "4", "4", "3", "10", "7", "6"]
RESPONSES = [["3", "12", "3 3"], ["17", "1", "7"], ["4", "10", "4 4"], ["4", "5", "22"],
             ["3", "27", "3"], ["10", "1", "0"], ["7", "71", "8"], ["6", "23", "66"]]
REWARDS = [[1, 0, 0.5], [1, 1, 0], [1, 0, 0.5], [1, 0, 0], [0, 0, 1], [1, 0.5, 0], [0, 1, 1], [1, 0, 0]]
HELD_OUT = ["6+1=", "3*3=", "4-4=", "1+1=", "12:4="]
# Numbers a shard does not share with the one-worker job: wall time and memory are the
# reporting worker's own; the noise floor is rank 0's recomputation of its own sequences.
UNSHARED = {"timing", "memory", "noise_floor"}
REL, ABS = 1e-5, 1e-9


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return write_tiny_checkpoint(str(root), TinyConfig(init_std=0.1, train_steps=4))


@pytest.fixture(scope="module")
def caches():
    """One model cache per rank, as each worker has its own (a shard moves its own weights)."""
    return [ModelCache() for _ in range(3)]


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ckpt[0])


def _spec(ckpt, **over) -> ProbeSpec:
    base, adapter = ckpt
    fields = dict(checkpoint=CheckpointSpec(base, adapter), responses_per_prompt=G,
                  generation=GenerationSpec(max_new_tokens=MAX_NEW),
                  realized=RealizedSpec(lr_multipliers=[0.5, 1.0, 2.0]), lr_override=0.05,
                  microbatch_size=2, trace_memory=False, seed=11)
    fields.update(over)
    return ProbeSpec(**fields)


def _rollouts(tokenizer) -> list[ClientRollout]:
    eos = tokenizer.eos_token_id
    return [ClientRollout(p, [tokenizer.encode(r) + ([eos] if k != 1 else [])
                              for k, r in enumerate(resps)], [float(x) for x in rew])
            for p, resps, rew in zip(PROMPTS, RESPONSES, REWARDS)]


def _sharded(spec: ProbeSpec, caches, k: int, hooks=None):
    """Rank 0's outcome of a job over k shards (threads), each with its own model cache."""
    group = ThreadGroup(k)
    outs = group.run(lambda comm: run_probe(spec, cache=caches[comm.rank],
                                            hooks=(hooks or {}).get(comm.rank),
                                            collective=comm))
    return outs[0]


def _numbers(tree, path=()):
    """Every number of a result's JSON, by path, except the unshared ones."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key not in UNSHARED:
                yield from _numbers(value, path + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _numbers(value, path + (i,))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)
    else:
        yield path, tree


def assert_same_result(one, many, spec: ProbeSpec) -> int:
    """Every number of `many` equals `one`'s (rel 1e-5); returns how many were compared."""
    a = dict(_numbers(to_result(one, spec.checkpoint).model_dump(mode="json")))
    b = dict(_numbers(to_result(many, spec.checkpoint).model_dump(mode="json")))
    assert a.keys() == b.keys()
    bad = [(p, a[p], b[p]) for p in a
           if not (a[p] == b[p] or (isinstance(a[p], float) and isinstance(b[p], float)
                                    and math.isclose(a[p], b[p], rel_tol=REL, abs_tol=ABS)))]
    assert not bad, bad[:10]
    return sum(isinstance(v, float) for v in a.values())


def test_shard_units_cover_every_unit_once_in_order():
    for n in range(0, 12):
        for k in range(1, 5):
            blocks = [list(shard_units(n, r, k)) for r in range(k)]
            assert sum(blocks, []) == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_combine_sums_in_rank_order_and_gathers():
    import torch
    values = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([0.5, -2.0])}]
    assert combine("sum", values)["a"].tolist() == [1.5, 0.0]
    assert values[0]["a"].tolist() == [1.0, 2.0]          # the inputs are left alone
    assert combine("gather", [1, "x"]) == [1, "x"]
    with pytest.raises(ValueError):
        combine("max", [1])


CLIENT_CASES = {
    "exact_full_vocabulary_token_mean_bonus": dict(
        entropy=EntropySpec(estimator="full_vocabulary", normalization="token_mean"),
        objective=ObjectiveSpec(length_norm="token_mean", entropy_coef=0.3)),
    "blocks_sampled_sequence": dict(
        estimator=EstimatorSpec(mode="blocks", block_size=2),
        entropy=EntropySpec(estimator="sampled", normalization="sequence")),
    "over_host_budget": dict(host_budget_bytes=0, max_grad_norm=1e-3),
}


@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
def test_client_rollouts_over_two_and_three_shards_equal_one(ckpt, caches, tokenizer, case):
    spec = _spec(ckpt, rollouts=_rollouts(tokenizer), reward_kind="provided",
                 **CLIENT_CASES[case])
    one = run_probe(spec, cache=caches[0])
    for k in (2, 3):
        many = _sharded(spec, caches, k)
        compared = assert_same_result(one, many, spec)
        assert compared > 50
        assert many.passes == one.passes                  # the job's whole work, summed
    if case == "over_host_budget":
        assert any("second gradient pass" in w for w in many.warnings)
        assert many.warnings == one.warnings              # each warning once


def test_sampled_prompts_give_the_same_responses_on_two_shards(ckpt, caches):
    spec = _spec(ckpt, prompts=PROMPTS, answers=ANSWERS, reward_kind="exact_match",
                 generation=GenerationSpec(max_new_tokens=MAX_NEW, batch_size=G * 2))
    one = run_probe(spec, cache=caches[0])
    many = _sharded(spec, caches, 2)
    assert many.sequences.logprob.tolist() == pytest.approx(one.sequences.logprob.tolist(),
                                                            rel=REL, abs=1e-6)
    assert many.sequences.length.tolist() == one.sequences.length.tolist()
    assert_same_result(one, many, spec)


@pytest.mark.parametrize("g_e", [1, 4])
def test_two_batch_over_two_shards_equals_one(ckpt, caches, tokenizer, g_e):
    spec = _spec(ckpt, rollouts=_rollouts(tokenizer), reward_kind="provided",
                 entropy=EntropySpec(estimator="full_vocabulary", normalization="token_mean"),
                 entropy_batch=EntropyBatchSpec(prompts=HELD_OUT, responses_per_prompt=g_e))
    one = run_probe(spec, cache=caches[0])
    many = _sharded(spec, caches, 2)
    assert one.delta_h1.se_unconditional is not None
    assert_same_result(one, many, spec)


def test_a_failing_shard_stops_the_job_without_hanging(ckpt, caches, tokenizer):
    spec = _spec(ckpt, rollouts=_rollouts(tokenizer), reward_kind="provided")
    seen = []

    def cancel_in_step(phase, done, total):
        seen.append(phase)

    hooks = {1: ProbeHooks(progress=cancel_in_step,
                           should_cancel=lambda: "gradients" in seen)}
    with pytest.raises(ProbeCancelled) as err:
        _sharded(spec, caches, 2, hooks)
    assert err.value.phase == "gradients"
    # the caches are still usable: the next job on them succeeds and equals one shard's
    again = _sharded(spec, caches, 2)
    assert_same_result(run_probe(spec, cache=caches[0]), again, spec)


class _ExpiresInExchange:
    """One shard whose k-th exchange ends at the deadline (as a shard waiting on a slow peer
    does in the service: service/shard.QueueCollective raises with no phase)."""

    rank, size = 0, 1

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def exchange(self, op, value):
        self.calls += 1
        if self.calls == self.at:
            raise DeadlineExceeded("the job ran past its deadline")
        return SOLO.exchange(op, value)


def test_a_deadline_in_an_exchange_gets_the_phase_and_memory_trace(ckpt, caches, tokenizer):
    spec = _spec(ckpt, rollouts=_rollouts(tokenizer), reward_kind="provided",
                 trace_memory=True)
    with pytest.raises(DeadlineExceeded) as err:
        run_probe(spec, cache=caches[0], collective=_ExpiresInExchange(at=1))
    assert err.value.phase == "gradients"          # the first exchange: the gradients' reduce
    assert [p.phase for p in err.value.trace] == ["load", "rollouts", "teacher_forcing",
                                                  "gradients"]
