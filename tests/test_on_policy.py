"""The on-policy check of client rollouts (batch.on_policy_z): z of mean(S + f) is about N(0, 1)
over batches sampled from the checkpoint's exact policy, and far from 0 (with a warning) when
the rollouts were sampled at another temperature or written by hand. In the 6-token world."""

from __future__ import annotations

import random
import statistics

import pytest

from exact_world import PROMPT_POOL, SIX_TOKEN_WORLD, load_policy, sampled_rollouts
from probe_core.checkpoint import ModelCache
from probe_core.entropy import SequenceStats, on_policy_z
from probe_core.probe import OFF_POLICY_Z, run_probe
from probe_core.spec import (CheckpointSpec, ClientRollout, EntropyBatchSpec, EntropySpec,
                             GenerationSpec, ProbeSpec, RealizedSpec)
from probe_core.tiny import write_tiny_checkpoint

SEEDS, B, G, MAX_NEW = 40, 8, 6, 3
OFF_POLICY = "do not look sampled from this checkpoint's policy"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base, adapter = write_tiny_checkpoint(str(tmp_path_factory.mktemp("onpolicy")),
                                          SIX_TOKEN_WORLD)
    model, tok, _ = load_policy(base, adapter)
    return base, adapter, model, tok, ModelCache()


def _probe(world, rollouts, temperature: float = 1.0, **over):
    base, adapter, _, _, cache = world
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts,
                     reward_kind="provided", responses_per_prompt=len(rollouts[0].responses),
                     generation=GenerationSpec(max_new_tokens=MAX_NEW, temperature=temperature),
                     microbatch_size=16, realized=RealizedSpec(enabled=False),
                     trace_memory=False, **over)
    return run_probe(spec, cache=cache)


def _drawn(world, seed: int, count: int = B) -> list[ClientRollout]:
    """`count` prompts drawn independently from the pool, G responses each sampled from the
    policy at temperature 1, rewards: the response holds an 'a'."""
    _, _, model, tok, _ = world
    a_id = tok.convert_tokens_to_ids("a")
    rng = random.Random(seed)
    prompts = [PROMPT_POOL[rng.randrange(len(PROMPT_POOL))] for _ in range(count)]
    return sampled_rollouts(model, tok, prompts, G, MAX_NEW, seed=seed,
                            reward_fn=lambda r: float(a_id in r))


def test_z_is_standard_normal_on_policy_and_never_warns(world):
    zs = []
    for seed in range(SEEDS):
        out = _probe(world, _drawn(world, seed))
        assert not any(OFF_POLICY in w for w in out.warnings), out.warnings
        zs.append(out.batch.on_policy_z)
    mean, sd = statistics.mean(zs), statistics.stdev(zs)
    print(f"\non-policy z over {SEEDS} batches of {B}x{G}: mean {mean:+.3f}, SD {sd:.3f}, "
          f"max |z| {max(map(abs, zs)):.2f}")
    assert abs(mean) < 4 / SEEDS ** 0.5          # E[z] = 0: within 4 SE of the mean
    assert 0.6 < sd < 1.5


def test_rollouts_from_another_temperature_or_by_hand_warn(world):
    rollouts = _drawn(world, seed=99, count=16)
    colder = _probe(world, rollouts, temperature=0.5)     # sampled at 1, probed at 0.5
    assert colder.batch.on_policy_z < -OFF_POLICY_Z
    assert any(OFF_POLICY in w and "temperature 0.5" in w for w in colder.warnings)
    from service.mapping import to_result
    from service.summary import summarize
    text = summarize(to_result(colder))
    assert f"on-policy z {colder.batch.on_policy_z:+.1f}" in text and OFF_POLICY in text
    warmer = _probe(world, rollouts, temperature=3.0)
    assert warmer.batch.on_policy_z > OFF_POLICY_Z        # likelier under π_3 than typical
    tok = world[3]
    eos = tok.eos_token_id
    fixed = [ClientRollout(r.prompt, [tok.encode("e e") + [eos]] * (G - 1) + [tok.encode("d")],
                           [1.0] * (G - 1) + [0.0]) for r in rollouts]
    by_hand = _probe(world, fixed)
    print(f"\nz: probed at 0.5 {colder.batch.on_policy_z:+.1f}, at 3.0 "
          f"{warmer.batch.on_policy_z:+.1f}, written by hand {by_hand.batch.on_policy_z:+.1f}")
    assert abs(by_hand.batch.on_policy_z) > OFF_POLICY_Z
    assert any(OFF_POLICY in w for w in by_hand.warnings)


def test_z_is_null_without_full_vocabulary_entropy(world):
    rollouts = _drawn(world, seed=7)
    assert _probe(world, rollouts, entropy=EntropySpec(estimator="sampled")
                  ).batch.on_policy_z is None
    two_batch = _probe(world, rollouts, entropy_batch=EntropyBatchSpec(
        prompts=PROMPT_POOL[:6], responses_per_prompt=2))
    assert two_batch.batch.on_policy_z is None


def test_z_statistic_itself():
    import torch
    stats = SequenceStats(logprob=torch.tensor([-1.0, -2.0, -3.0]),
                          length=torch.ones(3), entropy=torch.tensor([1.5, 2.5, 3.5]),
                          baseline=torch.zeros(3))
    assert on_policy_z(stats) is None                      # no spread
    stats.entropy = torch.tensor([1.5, 2.0, 4.0])          # d = 0.5, 0, 1
    d = torch.tensor([0.5, 0.0, 1.0])
    assert on_policy_z(stats) == pytest.approx(float(d.mean() / (d.std() / 3 ** 0.5)))
