"""Two-batch mode (issue 14) held to exact enumeration of the 6-token world, with U and E prompts
drawn independently from a pool of 40 distinct prompts.

Every response of ≤ 3 new tokens over {<eos>, a, b, c, d, e} is enumerated, so each pool
prompt's H_p(θ), ∇H_p and H_p(θ + Δθ) are exact. Per seed, the probe takes its step from a U
batch and measures δH₁ and the realized ΔH on an E batch; over the seeds the errors against the
exact values must be centred (within 4 SE of their mean) and the reported SEs must match their
spread. The last test is the regression test of the audit's finding: single-batch SNIS on the
batch's own responses lies above the exact change on fresh prompts, two-batch does not.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import pytest
import torch

from exact_world import (all_responses, flat_grad, load_policy, response_logprobs,
                         sampled_rollouts, set_flat)
from probe_core.checkpoint import ModelCache
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, EntropyBatchSpec, GenerationSpec, ProbeSpec,
                             RealizedSpec)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

WORLD = TinyConfig(alphabet="abcde", pad_equals_eos=True, init_std=0.3, seed=5)
POOL = ["".join(c) for k in (1, 2) for c in itertools.product("abcde", repeat=k)] + \
    ["abc", "bad", "cab", "dec", "eda", "ace", "bed", "cde", "dab", "eab"]     # 40 distinct
G_U, MAX_NEW = 6, 3
B_U = 8
E_SEQUENCES = 64          # B_E·G_E, the same for every G_E
LR = 0.02
SEEDS = int(os.environ.get("TWO_BATCH_SEEDS", 40))


@dataclass
class Pool:
    """Exact per-prompt quantities of the pool, and what the probes need to run."""

    base: str
    adapter: str
    model: object
    tok: object
    params: list
    theta: torch.Tensor
    h: torch.Tensor          # H_p(θ) [40]
    grad_h: torch.Tensor     # ∇H_p [40, P]
    cache: ModelCache

    def entropy_at(self, theta: torch.Tensor) -> torch.Tensor:
        """H_p at θ for every pool prompt [40], exactly."""
        with torch.no_grad():
            set_flat(self.params, theta)
            h = torch.stack([_prompt_entropy(self.model, p) for p in self.prompt_ids])
            set_flat(self.params, self.theta)
        return h

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [self.tok.encode(p) for p in POOL]


def _prompt_entropy(model, prompt: list[int]) -> torch.Tensor:
    s = response_logprobs(model, prompt, all_responses(6, 0, MAX_NEW))
    return -(s.exp() * s).sum()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Pool:
    root = tmp_path_factory.mktemp("two_batch")
    base, adapter = write_tiny_checkpoint(str(root), WORLD)
    model, tok, params = load_policy(base, adapter)
    assert tok.eos_token_id == 0
    hs, grads = [], []
    for p in POOL:
        h = _prompt_entropy(model, tok.encode(p))
        hs.append(h.detach())
        grads.append(flat_grad(h, params))
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    return Pool(base, adapter, model, tok, params, theta, torch.stack(hs), torch.stack(grads),
                ModelCache())


def _draw(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(len(POOL), (n,), generator=gen).tolist()


def _run(pool: Pool, seed: int, g_e: int | None, multipliers=(1.0,)):
    """One probe: U batch of B_U pool prompts (sampled rollouts, reward = 'a' in the response),
    with an E batch of E_SEQUENCES/g_e other draws from the pool when g_e is set. Returns
    (outcome, U prompt indices, E prompt indices)."""
    u_idx, e_idx = _draw(2 * seed, B_U), _draw(2 * seed + 1, E_SEQUENCES // (g_e or 1))
    a_id = pool.tok.convert_tokens_to_ids("a")
    rollouts = sampled_rollouts(pool.model, pool.tok, [POOL[i] for i in u_idx], G_U, MAX_NEW,
                                seed=seed, reward_fn=lambda r: float(a_id in r))
    spec = ProbeSpec(
        checkpoint=CheckpointSpec(pool.base, pool.adapter), rollouts=rollouts,
        reward_kind="provided", responses_per_prompt=G_U,
        generation=GenerationSpec(max_new_tokens=MAX_NEW), lr_override=LR,
        realized=RealizedSpec(lr_multipliers=list(multipliers)), microbatch_size=64,
        trace_memory=False, seed=seed,
        entropy_batch=None if g_e is None else EntropyBatchSpec(
            prompts=[POOL[i] for i in e_idx], responses_per_prompt=g_e))
    return run_probe(spec, cache=pool.cache), u_idx, e_idx


def _z_of_mean(errors: torch.Tensor) -> float:
    return float(errors.mean()) / (float(errors.std()) / math.sqrt(errors.numel()))


@pytest.mark.parametrize("g_e", [1, 4])
def test_two_batch_matches_exact_held_out_change_and_its_se_is_calibrated(pool, g_e):
    rows = []
    for seed in range(SEEDS):
        out, _, e_idx = _run(pool, seed, g_e)
        d, r = out.delta_h1, out.realized
        delta = out.step.delta
        exact_first = float(pool.grad_h[e_idx].mean(0) @ delta)             # ∇H_E·Δθ_U
        exact_change = float((pool.entropy_at(pool.theta + delta) - pool.h)[e_idx].mean())
        exact_h = float(pool.h[e_idx].mean())
        _, est = r.main
        rows.append((d.total - exact_first, d.se, est.delta_h - exact_change, est.se,
                     r.h_before - exact_h, d.se_unconditional, exact_first))
        assert d.u_statistic is None and out.mode == "two_batch"
        assert out.units == E_SEQUENCES // g_e
        assert d.target == "held_out" and r.target == "held_out"
        assert out.entropy_batch.responses_per_prompt == g_e
    err, se, r_err, r_se, h_err, se_unc, exact = (torch.tensor(c, dtype=torch.float64)
                                                   for c in zip(*rows))
    # centred: the mean error over seeds is within 4 SE of its mean
    for e in (err, r_err, h_err):
        assert abs(_z_of_mean(e)) < 4, (g_e, float(e.mean()), float(e.std()))
    # calibrated: the reported SE matches the spread of the error over seeds
    ratio = float(se.pow(2).mean().sqrt() / err.std())
    print(f"\nG_E={g_e}: δH₁ SE/SD = {ratio:.3f} (SD {float(err.std()):.3e}); "
          f"ΔH SE/SD = {float(r_se.pow(2).mean().sqrt() / r_err.std()):.3f}")
    assert 0.8 <= ratio <= 1.25, ratio
    assert (se_unc >= se).all()
    # the test has power: a probe that answered 0 would be off by many SEs of the mean error
    assert abs(float(exact.mean())) > 4 * float(err.std()) / math.sqrt(SEEDS)


def test_single_batch_realized_overstates_the_fresh_prompt_change_two_batch_does_not(pool):
    """The audit's finding at B = 8 with prompts drawn independently: the single-batch realized
    ΔH (SNIS on the responses that built Δθ) lies above the exact change on fresh prompts (the
    pool's), by the self-prompt and same-response terms; the two-batch ΔH on held-out prompts
    and both δH₁ do not."""
    rows = []
    for seed in range(SEEDS):
        single, _, _ = _run(pool, seed, None)
        double, _, e_idx = _run(pool, seed, 1)
        delta = single.step.delta
        torch.testing.assert_close(double.step.delta, delta)     # the same step from U
        change = pool.entropy_at(pool.theta + delta) - pool.h        # [40] exact, per prompt
        fresh = float(change.mean())                                 # T_pop
        rows.append((single.realized.main[1].delta_h - fresh,
                     double.realized.main[1].delta_h - float(change[e_idx].mean()),
                     single.delta_h1.total - float(pool.grad_h.mean(0) @ delta),
                     double.delta_h1.total - float(pool.grad_h[e_idx].mean(0) @ delta),
                     fresh))
    single_excess, double_err, single_d1, double_d1, fresh = (
        torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    print(f"\nT_pop {float(fresh.mean()):+.4f}; single-batch SNIS excess "
          f"{float(single_excess.mean()):+.4f} ± {float(single_excess.std()) / SEEDS ** .5:.4f};"
          f" two-batch ΔH error {float(double_err.mean()):+.4f} ± "
          f"{float(double_err.std()) / SEEDS ** .5:.4f}; SD of δH₁ error single "
          f"{float(single_d1.std()):.4e} two-batch {float(double_d1.std()):.4e}")
    assert _z_of_mean(single_excess) > 4
    assert abs(_z_of_mean(double_err)) < 4
    assert abs(_z_of_mean(double_d1)) < 4
