"""The reward side held to exact enumeration of the 6-token world (issue 15).

Every response of ≤ 3 new tokens over {<eos>, a, b, c, d, e} is enumerated, so the mean reward
J(θ) = (1/B) Σ_n E_{y∼π(·|p_n)}[R], its gradient and J(θ + sΔθ) are exact. The B prompts are
drawn independently (with replacement) from a pool of 40 distinct prompts; the probe sees one
sampled batch of G responses each, with TRL's default loss (loss_type="dapo": token_mean) and
scale_rewards="batch", and must land within 4 SE of the exact values.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from exact_world import exact_reward, flat_grad, load_policy, sampled_rollouts, value_at
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, GenerationSpec, ObjectiveSpec, ProbeSpec,
                             RealizedSpec)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

WORLD = TinyConfig(alphabet="abcde", pad_equals_eos=True, init_std=0.3, seed=5)
POOL = ["".join(p) for n in (1, 2) for p in itertools.product("abcde", repeat=n)] + \
    ["abc", "bad", "cab", "eed", "dea", "ace", "bed", "cde", "eba", "dab"]
B, G, MAX_NEW = 160, 6, 3
LR = 0.02
MULTIPLIERS = [1.0, 0.3, 0.0]


def frequent_reward(tokens: list[int], a_id: int) -> float:
    return float(a_id in tokens)


@dataclass
class RewardWorld:
    out: object                 # the probe's ProbeOutcome
    model: object
    params: list
    rewards: torch.Tensor       # [B, G] the batch's rewards
    theta: torch.Tensor         # [P]
    j: float                    # exact J(θ) of the batch's prompts
    grad_j: torch.Tensor        # exact ∇J [P]
    counts: dict                # prompt ids (tuple) → times drawn
    reward_fn: object

    def j_at(self, theta: torch.Tensor) -> float:
        return value_at(self.params, theta, self.theta,
                        lambda: _batch_reward(self.model, self.counts, self.reward_fn))


def _batch_reward(model, counts: dict, reward_fn) -> torch.Tensor:
    """Exact J of the drawn prompts: each distinct prompt once, weighted by its count."""
    eos = 0
    total = sum(counts.values())
    return sum(n * exact_reward(model, [list(p)], 6, eos, MAX_NEW, reward_fn)
               for p, n in counts.items()) / total


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> RewardWorld:
    root = tmp_path_factory.mktemp("reward_exact")
    base, adapter = write_tiny_checkpoint(str(root), WORLD)
    model, tok, params = load_policy(base, adapter)
    assert tok.eos_token_id == 0
    a_id = tok.convert_tokens_to_ids("a")
    reward_fn = lambda r: frequent_reward(r, a_id)   # noqa: E731
    draw = torch.randint(len(POOL), (B,), generator=torch.Generator().manual_seed(11))
    texts = [POOL[i] for i in draw.tolist()]
    rollouts = sampled_rollouts(model, tok, texts, G, MAX_NEW, seed=3, reward_fn=reward_fn)
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts,
                     reward_kind="provided", responses_per_prompt=G,
                     generation=GenerationSpec(max_new_tokens=MAX_NEW), lr_override=LR,
                     objective=ObjectiveSpec(advantage="batch_standardized",
                                             length_norm="token_mean"),
                     realized=RealizedSpec(lr_multipliers=MULTIPLIERS), microbatch_size=8)
    out = run_probe(spec)
    counts = Counter(tuple(tok.encode(t)) for t in texts)
    j = _batch_reward(model, counts, reward_fn)
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
    return RewardWorld(out, model, params, rewards, theta, float(j.detach()),
                       flat_grad(j, params), counts, reward_fn)


def test_prompts_are_drawn_from_a_pool(world):
    assert len(POOL) == len(set(POOL)) >= 30
    assert len(world.counts) >= 30            # most of the pool is in the batch


def test_reward_mean_is_the_exact_mean_reward(world):
    se = math.sqrt(float(world.rewards.var(1).sum()) / (B * B * G))
    assert abs(world.out.batch.reward_mean - world.j) < 4 * se, (world.out.batch.reward_mean,
                                                                 world.j, se)


def test_realized_delta_j_matches_exact_change(world):
    """realized ΔJ = Σŵ R − mean R on the same responses against exact J(θ + sΔθ) − J(θ)."""
    delta = world.out.step.delta
    for s, est in world.out.realized.by_multiplier:
        exact = world.j_at(world.theta + s * delta) - world.j
        if s == 0.0:
            assert est.reward.delta_j == 0.0
            continue
        assert abs(est.reward.delta_j - exact) < 4 * est.reward.se, (s, est.reward, exact)
    _, main = world.out.realized.main
    exact = world.j_at(world.theta + delta) - world.j
    assert abs(exact) > 2 * main.reward.se      # the step's reward gain is resolved


def test_exact_first_order_reward_change_is_the_limit(world):
    """Ground truth for δJ₁: s·∇J·Δθ / (J(θ + sΔθ) − J(θ)) → 1 as s → 0, and the step this
    objective takes raises the reward."""
    delta = world.out.step.delta
    first = float(world.grad_j @ delta)
    assert first > 0
    ratios = [s * first / (world.j_at(world.theta + s * delta) - world.j)
              for s in (0.3, 0.03, 0.003)]
    assert abs(ratios[-1] - 1) < 0.01 and abs(ratios[-1] - 1) < abs(ratios[0] - 1)
