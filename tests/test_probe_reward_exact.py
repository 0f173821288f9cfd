"""The reward side held to exact enumeration of the 6-token world (issue 15).

Every response of ≤ 3 new tokens over {<eos>, a, b, c, d, e} is enumerated, so the mean reward
J(θ) = (1/B) Σ_n E_{y∼π(·|p_n)}[R], its gradient and J(θ + sΔθ) are exact. The B prompts are
drawn independently (with replacement) from a pool of 40 distinct prompts; the probe sees one
sampled batch of G responses each, with TRL's default loss (loss_type="dapo": token_mean) and
scale_rewards="batch", and must land within 4 SE of the exact values.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from exact_world import (PROMPT_POOL, SIX_TOKEN_WORLD, exact_entropy, exact_reward, flat_grad,
                         load_policy, sampled_rollouts, token_terms, value_at)
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, EntropySpec, GenerationSpec, ObjectiveSpec,
                             ProbeSpec, RealizedSpec)
from probe_core.tiny import write_tiny_checkpoint

WORLD, POOL = SIX_TOKEN_WORLD, PROMPT_POOL
B, G, MAX_NEW = 160, 6, 3
LR = 0.02
MULTIPLIERS = [1.0, 0.3, 0.0]
# sequence-level entropy, so the exact ∇H is the gradient of exact_entropy
KIND = EntropySpec(normalization="sequence", estimator="full_vocabulary")
BONUS = 0.5            # entropy_coef of the bonus world
TARGET = 0.0           # hold entropy: the coefficient for δH₁ = 0


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
    grad_h: torch.Tensor        # exact ∇H (sequence entropy of the batch's prompts) [P]
    grad_bonus: torch.Tensor    # ∇ of TRL's bonus on this batch, Σ_i Σ_t h_it / T_tot [P]

    def j_at(self, theta: torch.Tensor) -> float:
        return value_at(self.params, theta, self.theta,
                        lambda: _batch_reward(self.model, self.counts, self.reward_fn))


def _batch_reward(model, counts: dict, reward_fn) -> torch.Tensor:
    """Exact J of the drawn prompts: each distinct prompt once, weighted by its count."""
    eos = 0
    total = sum(counts.values())
    return sum(n * exact_reward(model, [list(p)], 6, eos, MAX_NEW, reward_fn)
               for p, n in counts.items()) / total


def _batch_entropy(model, counts: dict) -> torch.Tensor:
    total = sum(counts.values())
    return sum(n * exact_entropy(model, [list(p)], 6, 0, MAX_NEW) for p, n in counts.items()) \
        / total


def _bonus_gradient(model, tok, rollouts, params) -> torch.Tensor:
    """The gradient TRL's entropy bonus adds: ∇(Σ_i Σ_t h_it / T_tot) on the batch, through
    the logits only (brute force, one sequence at a time)."""
    hs = [token_terms(model, tok.encode(r.prompt), resp)[1]
          for r in rollouts for resp in r.responses]
    return flat_grad(torch.cat(hs).sum() / sum(len(h) for h in hs), params)


@pytest.fixture(scope="module", params=[0.0, BONUS], ids=["no_bonus", "bonus"])
def world(request, tmp_path_factory) -> RewardWorld:
    coef = request.param
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
                                             length_norm="token_mean", entropy_coef=coef,
                                             target_delta_h=TARGET),
                     entropy=KIND, realized=RealizedSpec(lr_multipliers=MULTIPLIERS),
                     microbatch_size=8)
    out = run_probe(spec)
    counts = Counter(tuple(tok.encode(t)) for t in texts)
    j = _batch_reward(model, counts, reward_fn)
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
    return RewardWorld(out, model, params, rewards, theta, float(j.detach()),
                       flat_grad(j, params), counts, reward_fn,
                       flat_grad(_batch_entropy(model, counts), params),
                       _bonus_gradient(model, tok, rollouts, params))


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


def test_delta_j1_matches_exact_first_order_reward_change(world):
    """δJ₁ against the exact ∇J·Δθ along the step taken (with the bonus when there is one)."""
    d = world.out.reward.delta_j1
    exact = float(world.grad_j @ world.out.step.delta)
    print(f"\nδJ₁ = {d.total:+.4e} ± {d.se:.1e} (exact {exact:+.4e}); informative units "
          f"{d.informative_units}/{B}; bonus term {d.entropy_bonus_term:+.2e}")
    assert d.se_reliable and d.informative_units >= 4
    assert abs(d.total - exact) < 4 * d.se
    assert abs(exact) > 2 * d.se                     # the reward gain is resolved
    assert math.isclose(d.total, d.gradient_term + d.momentum_term + d.weight_decay_term
                        + d.entropy_bonus_term, rel_tol=1e-9, abs_tol=1e-15)


def test_delta_h1_and_exchange_rate_match_exact_along_the_step(world):
    """δH₁ (its step includes the bonus) and δH₁/δJ₁ against exact ∇H·Δθ and the exact
    ratio."""
    dh, delta = world.out.delta_h1, world.out.step.delta
    exact_h = float(world.grad_h @ delta)
    assert abs(dh.total - exact_h) < 4 * dh.se, (dh.total, exact_h, dh.se)
    rate = world.out.reward.exchange_rate
    exact_rate = exact_h / float(world.grad_j @ delta)
    print(f"\nδH₁ = {dh.total:+.4e} ± {dh.se:.1e} (exact {exact_h:+.4e}); exchange rate "
          f"{rate.value:+.3f} ± {rate.se:.3f} (exact {exact_rate:+.3f})")
    assert abs(rate.value - exact_rate) < 4 * rate.se


def test_entropy_bonus_term_and_coefficient_for_target(world):
    """The bonus's part of δH₁ against its exact value −∇H·(lr(1−β1)κ·D ⊙ c·∇H_TRL), and
    entropy_coef_for_target against the coefficient that meets the target in the exact first
    order model (D and κ of this step held fixed)."""
    out, step = world.out, world.out.step
    coef = out.reward.entropy_coef_for_target
    bonus_dir = step.kappa * step.w_grad * world.grad_bonus       # dΔθ/dc, D and κ fixed
    exact_slope = float(world.grad_h @ bonus_dir)
    c = 0.0 if out.reward.entropy_bonus_term == 0 else BONUS
    exact_c = c + (TARGET - float(world.grad_h @ step.delta)) / exact_slope
    print(f"\nbonus term {out.reward.entropy_bonus_term:+.3e} (exact "
          f"{c * exact_slope:+.3e}); coefficient for δH₁ = {TARGET}: {coef.value:+.4f} ± "
          f"{coef.se:.4f} (exact {exact_c:+.4f})")
    assert abs(coef.value - exact_c) < 4 * coef.se
    # at the reported coefficient the exact first-order change meets the target
    at_coef = float(world.grad_h @ (step.delta + (coef.value - c) * bonus_dir))
    assert abs(at_coef - TARGET) < 4 * coef.se * abs(exact_slope)
    if c:
        assert abs(out.reward.entropy_bonus_term - c * exact_slope) < \
            0.25 * abs(c * exact_slope)
