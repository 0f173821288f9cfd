"""δJ₁'s standard error over many seeds in the 6-token world (issue 15), sparse and frequent
rewards.

Every response's S and ∇S is enumerated once per prompt of a pool of 40 (exact_world.
enumerated_gradients), so a batch is a draw of B prompts from the pool and G responses from the
exact policy, and its unit vectors are sums of exact per-response gradients: hundreds of seeds
run in seconds through probe_core's own coefficients, AdamW step, unit dots and estimators.
Each seed's δJ₁ is compared with the exact ∇J·Δθ along that seed's own step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from exact_world import (PROMPT_POOL, SIX_TOKEN_WORLD, enumerated_gradients, load_policy)
from probe_core import rewards as rw
from probe_core.adamw import AdamWState, adamw_step
from probe_core.estimators import cross_unit_delta_h1, unit_dots
from probe_core.estimators.base import contiguous_layout
from probe_core.optimizer_state import map_state
from probe_core.reward_side import (delta_j1, exchange_rate,
                                    informative_units, reward_weights)
from probe_core.tiny import write_tiny_checkpoint

WORLD, POOL = SIX_TOKEN_WORLD, PROMPT_POOL
G, MAX_NEW, LR = 6, 3, 0.02
SEEDS = 400


@dataclass
class Enumerated:
    pi: torch.Tensor          # [K, R] exact response probabilities per pool prompt
    grads: torch.Tensor       # [K, R, P] ∇S, fp32
    responses: list
    state: AdamWState
    theta: torch.Tensor
    tok: object


@pytest.fixture(scope="module")
def enumerated(tmp_path_factory) -> Enumerated:
    from exact_world import all_responses
    base, adapter = write_tiny_checkpoint(str(tmp_path_factory.mktemp("calib")), WORLD)
    model, tok, _ = load_policy(base, adapter)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    s, grads = enumerated_gradients(model, named, [tok.encode(p) for p in POOL], 6,
                                    tok.eos_token_id, MAX_NEW)
    pi = s.exp()
    assert torch.allclose(pi.sum(1), torch.ones(len(POOL), dtype=torch.float64), atol=1e-5)
    sd = torch.load(f"{adapter}/optimizer.pt", weights_only=True)
    state = AdamWState.from_states(map_state(sd, named), LR)
    theta = torch.cat([p.detach().reshape(-1).double() for _, p in named])
    return Enumerated(pi / pi.sum(1, keepdim=True), grads, all_responses(6, 0, MAX_NEW), state,
                      theta, tok)


def _simulate(world: Enumerated, reward_fn, b: int, seeds: int) -> dict[str, torch.Tensor]:
    """Per seed: δJ₁, its SE, whether it is reliable, the exact ∇J·Δθ, and the exchange rate
    against the exact ratio (∇H·Δθ)/(∇J·Δθ)."""
    r_all = torch.tensor([reward_fn(r) for r in world.responses], dtype=torch.float64)  # [R]
    pi, grads = world.pi, world.grads.double()
    j_n = pi @ r_all                                                                 # [K]
    grad_j = torch.einsum("kr,krp->kp", pi * (r_all - j_n[:, None]), grads)         # [K, P]
    logpi = pi.log()
    grad_h = -torch.einsum("kr,krp->kp", pi * (logpi - (pi * logpi).sum(1, keepdim=True)),
                           grads)                                                   # [K, P]
    layout = contiguous_layout(b, G, 1)
    gen = torch.Generator().manual_seed(0)
    out = {k: [] for k in ("total", "se", "reliable", "exact", "rate", "rate_se", "rate_exact")}
    for _ in range(seeds):
        prompts = torch.randint(len(POOL), (b,), generator=gen)                         # [B]
        picks = torch.multinomial(pi[prompts], G, replacement=True, generator=gen)      # [B, G]
        rewards = r_all[picks]
        s = logpi[prompts[:, None], picks]                                               # [B, G]
        c_y = rw.advantages(rewards, "mean_centered") / (G * MAX_NEW)
        c_x = (s - (s.sum(1, keepdim=True) - s) / (G - 1)) / G
        c_z = reward_weights(rewards).view(b, G)
        g = world.grads[prompts[:, None], picks]                                         # [B, G, P]
        x, y, z = ((c.float()[..., None] * g).sum(1) for c in (c_x, c_y, c_z))           # [B, P]
        step = adamw_step(world.state, y.double().mean(0), world.theta, None)
        dj = delta_j1(unit_dots(z, y, step), step.kappa, informative_units(rewards, layout))
        dh = cross_unit_delta_h1(unit_dots(x, y, step), step.kappa)
        exact_j = float(grad_j[prompts].mean(0) @ step.delta)
        exact_h = float(grad_h[prompts].mean(0) @ step.delta)
        rate = exchange_rate(dh, dj)
        for k, v in (("total", dj.total), ("se", dj.se or 0.0), ("reliable", dj.se_reliable),
                     ("exact", exact_j), ("rate", rate.value if rate else math.nan),
                     ("rate_se", rate.se if rate else math.nan),
                     ("rate_exact", exact_h / exact_j)):
            out[k].append(float(v))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _report(name: str, res: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    err = res["total"] - res["exact"]
    ok = res["se"] > 0
    z = torch.where(ok, err / res["se"].clamp(min=1e-300), torch.full_like(err, math.inf))
    rel = res["reliable"] > 0
    print(f"\n{name}: J-exact mean {float(res['exact'].mean()):.3e}; reliable {int(rel.sum())}"
          f"/{rel.numel()}; z sd reliable {float(z[rel].std()):.2f}, mean "
          f"{float(z[rel].mean()):+.2f}, 95% coverage {float((z[rel].abs() < 1.96).double().mean()):.2f}"
          + (f"; unreliable (finite) z sd {float(z[~rel & ok].std()):.2f}, SE = 0 in "
             f"{int((~ok).sum())}" if (~rel).any() else ""))
    return z, rel


def test_frequent_reward_se_is_calibrated(enumerated):
    a, b = (enumerated.tok.convert_tokens_to_ids(t) for t in "ab")
    res = _simulate(enumerated, lambda r: float(a in r or b in r), 16, SEEDS)
    z, rel = _report("frequent reward (a or b in the response)", res)
    assert bool(rel.all())
    assert 0.75 < float(z.std()) < 1.25
    # Adam's D depends on this batch's Ȳ while the estimators hold it fixed (DESIGN): a
    # small negative bias, about half an SE here (the closing note of issue 15)
    assert abs(float(z.mean())) < 0.7
    assert float((z.abs() < 1.96).double().mean()) > 0.9
    assert float(res["exact"].mean()) > 4 * float(res["se"].mean()) / math.sqrt(SEEDS)


def test_sparse_reward_se_is_calibrated_where_reliable_and_flagged_where_not(enumerated):
    a = enumerated.tok.convert_tokens_to_ids("a")
    res = _simulate(enumerated, lambda r: float(r[0] == a), 16, SEEDS)
    z, rel = _report("sparse reward (the response starts with a)", res)
    # the flag fires where few units carry signal, and only there is the SE off
    assert 0.1 < float((~rel).double().mean()) < 0.6
    assert 0.75 < float(z[rel].std()) < 1.3
    assert float((z[rel].abs() < 1.96).double().mean()) > 0.88
    finite = ~rel & torch.isfinite(z)
    assert float(z[finite].std()) > 1.5 or int((~torch.isfinite(z)).sum()) > 0


def test_exchange_rate_is_calibrated_when_given(enumerated):
    """Where δJ₁ is clear of zero by one SE, δH₁/δJ₁ ± its delta-method SE covers the exact
    ratio (∇H·Δθ)/(∇J·Δθ) along each seed's step."""
    a, b = (enumerated.tok.convert_tokens_to_ids(t) for t in "ab")
    res = _simulate(enumerated, lambda r: float(a in r or b in r), 64, SEEDS // 2)
    given = ~res["rate"].isnan()
    assert float(given.double().mean()) > 0.25
    z = (res["rate"] - res["rate_exact"])[given] / res["rate_se"][given]
    print(f"\nexchange rate: given in {int(given.sum())}/{given.numel()}, z sd "
          f"{float(z.std()):.2f}, mean {float(z.mean()):+.2f}, exact ratio mean "
          f"{float(res['rate_exact'].mean()):+.3f}, 95% coverage {float((z.abs() < 1.96).double().mean()):.2f}")
    assert 0.7 < float(z.std()) < 1.4
    assert float((z.abs() < 1.96).double().mean()) > 0.85
