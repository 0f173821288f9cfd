"""The four entropy kinds held to exact enumeration of the 6-token world (issue 13).

token_mean | sequence × full_vocabulary | sampled: every response of ≤ 3 new tokens over
{<eos>, a, b, c, d, e} is enumerated (156 per prompt), so H_seq, E[T], their gradients and their
values after the step are exact. The batch's 192 prompts are drawn independently (with
replacement) from a pool of 32 distinct prompts: δH₁ is held to the pool's exact ∇H·Δθ along
the step taken (the fresh-prompt target, whose spread the jackknife SE includes), h_before and
the realized ΔH to the exact values on the batch's own prompts (the SNIS target, prompts as
strata). Deterministic identities are checked by enumeration through probe_core's own
teacher forcing.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
import torch

from exact_world import (PROMPT_POOL, SIX_TOKEN_WORLD, all_responses, flat_grad, load_policy,
                         response_moments, sampled_rollouts)
from probe_core.entropy import logprob_objective, pathwise_objective
from probe_core.probe import run_probe
from probe_core.rollouts import assemble
from probe_core.spec import (CheckpointSpec, EntropySpec, GenerationSpec, ProbeSpec,
                             RealizedSpec)
from probe_core.teacher_forcing import TeacherForcer
from probe_core.tiny import write_tiny_checkpoint

WORLD, POOL = SIX_TOKEN_WORLD, PROMPT_POOL[:32]
B, G, MAX_NEW, VOCAB = 480, 6, 3, 6
MULTIPLIERS = [1.0, 0.1]
LR = 0.02
KINDS = [EntropySpec(n, e) for n in ("token_mean", "sequence")
         for e in ("full_vocabulary", "sampled")]


def reward(tokens: list[int], a_id: int) -> float:
    return float(a_id in tokens)


@dataclass
class Exact:
    """Exact per-prompt H_n and E_n[T] of the pool, as functions of θ."""

    model: object
    params: list
    theta: torch.Tensor
    prompts: list[list[int]]       # the pool, tokenized
    responses: list[list[int]]

    def moments(self, theta: torch.Tensor | None = None, grad: bool = False):
        """[pool] H_n and E_n[T] at θ (default: the checkpoint's)."""
        if theta is not None:
            _set(self.params, theta)
        try:
            with torch.enable_grad() if grad else torch.no_grad():
                pairs = [response_moments(self.model, p, self.responses) for p in self.prompts]
        finally:
            if theta is not None:
                _set(self.params, self.theta)
        return torch.stack([h for h, _ in pairs]), torch.stack([t for _, t in pairs])


def _set(params, flat: torch.Tensor) -> None:
    off = 0
    for p in params:
        p.data.copy_(flat[off:off + p.numel()].view(p.shape).to(p.dtype))
        off += p.numel()


def entropy_of(h: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, kind: EntropySpec):
    """The kind's entropy of a prompt mixture (weights over the pool)."""
    if kind.normalization == "sequence":
        return (weight * h).sum() / weight.sum()
    return (weight * h).sum() / (weight * t).sum()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    base, adapter = write_tiny_checkpoint(str(root), WORLD)
    model, tok, params = load_policy(base, adapter)
    eos, a_id = tok.eos_token_id, tok.convert_tokens_to_ids("a")
    rng = random.Random(11)
    drawn = [rng.randrange(len(POOL)) for _ in range(B)]                 # independent draws
    rollouts = sampled_rollouts(model, tok, [POOL[i] for i in drawn], G, MAX_NEW, seed=7,
                                reward_fn=lambda r: reward(r, a_id))
    outs = {}
    for kind in KINDS:
        spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts,
                         reward_kind="provided", responses_per_prompt=G, entropy=kind,
                         generation=GenerationSpec(max_new_tokens=MAX_NEW), lr_override=LR,
                         realized=RealizedSpec(lr_multipliers=MULTIPLIERS), microbatch_size=6)
        outs[(kind.normalization, kind.estimator)] = run_probe(spec)
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    exact = Exact(model, params, theta, [tok.encode(p) for p in POOL],
                  all_responses(VOCAB, eos, MAX_NEW))
    counts = torch.bincount(torch.tensor(drawn), minlength=len(POOL)).double()
    return outs, exact, counts, tok


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k.normalization}-{k.estimator}")
def test_each_kind_matches_exact_enumeration(world, kind):
    outs, exact, counts, _ = world
    out = outs[(kind.normalization, kind.estimator)]
    assert out.entropy.normalization == kind.normalization
    assert out.entropy.estimator == kind.estimator
    uniform = torch.ones(len(POOL), dtype=torch.float64)
    h, t = exact.moments(grad=True)
    pool_h = entropy_of(h, t, uniform, kind)
    grad_h = flat_grad(pool_h, exact.params)                       # exact ∇H over the pool
    h, t = h.detach(), t.detach()
    # δH₁ against the exact first-order change along the step actually taken
    d = out.delta_h1
    first_order = float(grad_h @ out.step.delta)
    assert abs(d.total - first_order) < 4 * d.se, (d.total, first_order, d.se)
    if kind.estimator == "full_vocabulary":      # the test has power: the sign is resolved
        assert abs(first_order) > 2 * d.se
    # h_before and the realized change against the batch's own prompts, exactly
    r = out.realized
    batch_h = float(entropy_of(h, t, counts, kind))
    assert abs(r.h_before - batch_h) < 4 * r.h_before_se, (r.h_before, batch_h)
    for s, est in r.by_multiplier:
        h1, t1 = exact.moments(exact.theta + s * out.step.delta)
        change = float(entropy_of(h1, t1, counts, kind)) - batch_h
        assert abs(est.delta_h - change) < 4 * est.se, (s, est.delta_h, change, est.se)
    print(f"\n{kind.normalization:10} {kind.estimator:15} h_before {r.h_before:.4f} "
          f"(exact {batch_h:.4f} ± {r.h_before_se:.4f})  δH₁ {d.total:+.5f} ± {d.se:.5f} "
          f"(exact {first_order:+.5f})  ΔH {r.main[1].delta_h:+.5f} ± {r.main[1].se:.5f}")


def test_full_vocabulary_has_lower_spread_on_the_same_batch(world):
    """On the same responses, the Rao-Blackwellized numbers come with smaller SEs."""
    outs, *_ = world
    for norm in ("token_mean", "sequence"):
        full, sampled = outs[(norm, "full_vocabulary")], outs[(norm, "sampled")]
        assert full.realized.h_before_se < sampled.realized.h_before_se
        assert full.delta_h1.se < sampled.delta_h1.se
    # the step does not depend on the entropy kind (float rounding aside)
    steps = [o.step.delta for o in outs.values()]
    for s in steps[1:]:
        torch.testing.assert_close(s, steps[0], rtol=1e-4, atol=1e-6 * float(steps[0].abs().max()))


def _grad(value: torch.Tensor, params) -> torch.Tensor:
    """flat_grad that keeps the graph (several objectives of one forward)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def _weighted_grad(objective, coef: torch.Tensor, params) -> torch.Tensor:
    """Σ_i coef_i ∇O_i through the objective's own backward (as the probe runs it)."""
    outputs, grad_outputs = objective.backward_args(coef.float())
    grads = torch.autograd.grad(outputs, params, grad_outputs, retain_graph=True,
                                allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def _enumerated_tokens(world, prompt_text: str):
    """probe_core's teacher forcing (with grad) of every response of one prompt."""
    _, exact, _, tok = world
    prompt = tok.encode(prompt_text)
    batch = assemble([prompt], exact.responses, len(exact.responses), [tok.eos_token_id],
                     tok.pad_token_id, tok)
    forcer = TeacherForcer(exact.model, batch, 1.0, torch.device("cpu"), None)
    return forcer.tokens(torch.arange(batch.num_sequences), grad=True, entropy=True), prompt


@pytest.mark.parametrize("prompt_text", ["b", "cd", "bad"])
def test_identities_by_enumeration(world, prompt_text):
    """Σ_y π(y) Σ_t h_t = H_n; Σ_y π(y) ∇F(y) = ∇H_n (pathwise plus score-to-go form);
    Σ_y π(y) β ∇S(y) = 0 for a constant baseline; Σ_y π(y) T ∇S(y) = ∇E_n[T]."""
    _, exact, _, _ = world
    tokens, prompt = _enumerated_tokens(world, prompt_text)       # the fused head's path
    s = tokens.sequence_sum("logprob")                                   # [R], detached
    f = tokens.sequence_sum("entropy")
    pi = s.double().exp()
    h_exact, t_exact = response_moments(exact.model, prompt, exact.responses)
    assert abs(float(pi.sum()) - 1) < 1e-5
    assert math.isclose(float((pi * f.detach().double()).sum()), float(h_exact), rel_tol=1e-5)
    grad_h = _grad(h_exact, exact.params)
    pathwise = _weighted_grad(pathwise_objective(tokens), pi, exact.params)
    torch.testing.assert_close(pathwise, grad_h, rtol=1e-4, atol=1e-5 * float(grad_h.abs().max()))
    baseline = _weighted_grad(logprob_objective(tokens), pi, exact.params)   # Σπ∇S = ∇Σπ = 0
    assert float(baseline.norm()) < 1e-4 * float(grad_h.norm())
    lengths = torch.tensor([len(r) for r in exact.responses], dtype=torch.float64)
    length_grad = _weighted_grad(logprob_objective(tokens), pi * lengths, exact.params)
    grad_t = flat_grad(t_exact, exact.params)
    torch.testing.assert_close(length_grad, grad_t, rtol=1e-4,
                               atol=1e-5 * float(grad_t.abs().max()))
