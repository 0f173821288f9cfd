"""δH₁ and the realized change held to exact enumeration of a 6-token world (issues 3 and 4).

Every response of ≤ 3 new tokens over {<eos>, a, b, c, d, e} is enumerated (156 per prompt), so
H(θ), ∇H, E[R] and H(θ + sΔθ) are exact. The probe sees a large sampled batch; its estimates
must lie within 4 standard errors of the exact values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from exact_world import (SIX_TOKEN_WORLD, exact_entropy, exact_reward, flat_grad, load_policy,
                         sampled_rollouts, value_at)
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, EntropySpec, GenerationSpec, ProbeSpec,
                             RealizedSpec)
from probe_core.tiny import write_tiny_checkpoint

FIRST_ROUND = EntropySpec(normalization="sequence", estimator="sampled")

WORLD = SIX_TOKEN_WORLD
DISTINCT = ["ab", "cd", "e", "bad"]
COPIES = 48            # B = 192 prompts
G, MAX_NEW = 6, 3
MULTIPLIERS = [1.0, 0.3, 0.1, 0.03, 0.0]
LR = 0.02


def reward(tokens: list[int], a_id: int) -> float:
    return float(a_id in tokens)


@dataclass
class World:
    out: object
    model: object
    params: list
    prompts: list[list[int]]
    eos: int
    a_id: int
    theta: torch.Tensor
    grad_h: torch.Tensor     # exact ∇H
    grad_j: torch.Tensor     # exact ∇E[R]
    h: float                 # exact H(θ)

    def entropy_at(self, theta: torch.Tensor) -> float:
        return value_at(self.params, theta, self.theta,
                        lambda: exact_entropy(self.model, self.prompts, 6, self.eos, MAX_NEW))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("exact")
    base, adapter = write_tiny_checkpoint(str(root), WORLD)
    model, tok, params = load_policy(base, adapter)
    eos, a_id = tok.eos_token_id, tok.convert_tokens_to_ids("a")
    rollouts = sampled_rollouts(model, tok, DISTINCT * COPIES, G, MAX_NEW, seed=7,
                                reward_fn=lambda r: reward(r, a_id))
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), entropy=FIRST_ROUND,
                     rollouts=rollouts,
                     reward_kind="provided", responses_per_prompt=G,
                     generation=GenerationSpec(max_new_tokens=MAX_NEW), lr_override=LR,
                     realized=RealizedSpec(lr_multipliers=MULTIPLIERS), microbatch_size=4,
                     save_updated_adapter_to=str(root / "stepped"))
    out = run_probe(spec)
    prompts = [tok.encode(p) for p in DISTINCT]
    h = exact_entropy(model, prompts, 6, eos, MAX_NEW)
    grad_h = flat_grad(h, params)
    j = exact_reward(model, prompts, 6, eos, MAX_NEW, lambda x: reward(x, a_id))
    grad_j = flat_grad(j, params)
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    return World(out, model, params, prompts, eos, a_id, theta, grad_h, grad_j, float(h.detach()))


def _z(values: torch.Tensor, truth: float) -> float:
    """z-score of the mean of per-unit values against the truth."""
    se = float(values.std()) / math.sqrt(values.numel())
    return (float(values.mean()) - truth) / se


def test_unit_summaries_are_unbiased(world):
    """E[X_u] = −∇H_u and E[Y_u] = (G−1)/(G·ℓ)·∇E[R] (mean-centred advantages, ℓ = C)."""
    x, y = world.out.unit_x.double(), world.out.unit_y.double()
    mu_x = -world.grad_h
    mu_y = (G - 1) / (G * MAX_NEW) * world.grad_j
    gen = torch.Generator().manual_seed(0)
    directions = [world.grad_h, world.grad_j, torch.randn(x.shape[1], generator=gen,
                                                          dtype=torch.float64)]
    for e in directions:
        e = e / e.norm()
        assert abs(_z(x @ e, float(mu_x @ e))) < 4
        assert abs(_z(y @ e, float(mu_y @ e))) < 4
    # the test has power: the sign of the entropy gradient is detected
    assert abs(_z(x @ (world.grad_h / world.grad_h.norm()), 0.0)) > 4


def test_u_statistic_and_terms_match_exact_expectations(world):
    out = world.out
    step, d = out.step, out.delta_h1
    x = out.unit_x.double()
    mu_x = -world.grad_h
    mu_y = (G - 1) / (G * MAX_NEW) * world.grad_j
    u = d.u_statistic
    assert abs(u.value - float(mu_x @ (step.d * mu_y))) < 4 * u.se_jackknife
    assert abs(d.momentum_term - float(mu_x @ step.w_momentum)) < \
        4 * float((x @ step.w_momentum).std()) / math.sqrt(x.shape[0])
    assert abs(d.weight_decay_term - float(mu_x @ step.w_decay)) < \
        4 * float((x @ step.w_decay).std()) / math.sqrt(x.shape[0]) + 1e-12
    # δH₁ against the exact first-order change along the step actually taken
    first_order = float(world.grad_h @ step.delta)
    assert abs(d.total - first_order) < 4 * d.se, (d.total, first_order, d.se)
    assert abs(first_order) > 2 * d.se   # the signal is resolved, not just noise


def test_realized_matches_exact_entropy_after_the_saved_step(world):
    out = world.out
    r = out.realized
    assert abs(r.h_before - world.h) < 4 * r.h_before_se
    stepped = torch.cat([p.detach().reshape(-1).double()
                         for p in load_policy(*_paths(out), )[2]])
    torch.testing.assert_close(stepped - world.theta, out.step.delta, rtol=1e-4, atol=1e-7)
    for s, est in r.by_multiplier:
        exact = world.entropy_at(world.theta + s * out.step.delta) - world.h
        if s == 0.0:
            assert est.delta_h == 0.0 and est.ess_fraction == 1.0
        else:
            assert abs(est.delta_h - exact) < 4 * est.se, (s, est.delta_h, exact, est.se)


def _paths(out):
    adapter = out.updated_adapter
    return adapter.rsplit("/", 1)[0] + "/base", adapter


def test_first_order_ratio_tends_to_one_as_the_step_shrinks(world):
    """Exact ΔH(s) = H(θ + sΔθ) − H(θ) against the exact first order s·∇H·Δθ: the ratio → 1.
    The table is printed (pytest -s) for the closing note."""
    delta = world.out.step.delta
    first = float(world.grad_h @ delta)
    rows = []
    for s in (1.0, 0.3, 0.1, 0.03, 0.01):
        exact = world.entropy_at(world.theta + s * delta) - world.h
        rows.append((s, s * first, exact, s * first / exact))
    print("\n s      δH1_exact      ΔH_exact       ratio")
    for row in rows:
        print(" %-6g %+.6e  %+.6e  %.5f" % row)
    errors = [abs(ratio - 1) for *_, ratio in rows]
    assert errors[-1] < 0.01
    assert errors[-1] < errors[0]
    assert all(b <= a + 1e-3 for a, b in zip(errors, errors[1:]))
