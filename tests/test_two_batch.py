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

import math
import os
from dataclasses import dataclass

import pytest
import torch

from exact_world import (PROMPT_POOL, SIX_TOKEN_WORLD, all_responses, flat_grad, load_policy,
                         response_moments, sampled_rollouts, set_flat)
from probe_core.checkpoint import ModelCache
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, EntropyBatchSpec, EntropySpec, GenerationSpec,
                             ProbeSpec, RealizedSpec)
from probe_core.tiny import write_tiny_checkpoint

WORLD, POOL = SIX_TOKEN_WORLD, PROMPT_POOL
G_U, MAX_NEW = 6, 3
B_U = 8
E_SEQUENCES = 64          # B_E·G_E, the same for every G_E
LR = 0.02                 # first order holds: the calibration studies
COMPARE_LR = 0.05         # a larger step, for a change on fresh prompts well above the noise
SEEDS = int(os.environ.get("TWO_BATCH_SEEDS", 40))
COMPARE_SEEDS = 24


@dataclass
class Pool:
    """Exact per-prompt moments of the pool, and what the probes need to run."""

    base: str
    adapter: str
    model: object
    tok: object
    params: list
    theta: torch.Tensor
    h: torch.Tensor          # H_n(θ), the per-response entropy, [40]
    t: torch.Tensor          # E_n[T], the mean response length, [40]
    grad_h: torch.Tensor     # ∇H_n [40, P]
    grad_t: torch.Tensor     # ∇E_n[T] [40, P]
    cache: ModelCache

    def moments_at(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_n, E_n[T]) at θ for every pool prompt, [40] each, exactly."""
        with torch.no_grad():
            set_flat(self.params, theta)
            h, t = _moments(self.model, self.tok)
            set_flat(self.params, self.theta)
        return torch.stack(h), torch.stack(t)


def _moments(model, tok):
    responses = all_responses(6, tok.eos_token_id, MAX_NEW)
    pairs = [response_moments(model, tok.encode(p), responses) for p in POOL]
    return [h for h, _ in pairs], [t for _, t in pairs]


def entropy_of(normalization: str, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The entropy of a set of prompts from their moments (mean over the set's axis 0)."""
    return h.mean(0) / t.mean(0) if normalization == "token_mean" else h.mean(0)


def exact_first_order(pool: Pool, idx: list[int], normalization: str, delta) -> float:
    """∇H_set·Δθ for the prompts idx (token_mean by the quotient rule)."""
    gh = pool.grad_h[idx].mean(0) @ delta
    if normalization == "sequence":
        return float(gh)
    h, t = pool.h[idx].mean(), pool.t[idx].mean()
    return float((gh - h / t * (pool.grad_t[idx].mean(0) @ delta)) / t)


def exact_change(pool: Pool, idx: list[int], normalization: str, delta) -> float:
    h1, t1 = pool.moments_at(pool.theta + delta)
    return float(entropy_of(normalization, h1[idx], t1[idx])
                 - entropy_of(normalization, pool.h[idx], pool.t[idx]))


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Pool:
    root = tmp_path_factory.mktemp("two_batch")
    base, adapter = write_tiny_checkpoint(str(root), WORLD)
    model, tok, params = load_policy(base, adapter)
    hs, ts = _moments(model, tok)
    grad_h = torch.stack([flat_grad(h, params) for h in hs])
    grad_t = torch.stack([flat_grad(t, params) for t in _moments(model, tok)[1]])  # own graph
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    return Pool(base, adapter, model, tok, params, theta, torch.stack(hs).detach(),
                torch.stack(ts).detach(), grad_h, grad_t, ModelCache())


def _draw(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(len(POOL), (n,), generator=gen).tolist()


def _run(pool: Pool, seed: int, g_e: int | None, kind=("token_mean", "full_vocabulary"),
         multipliers=(1.0,), lr: float = LR):
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
        generation=GenerationSpec(max_new_tokens=MAX_NEW), lr_override=lr,
        realized=RealizedSpec(lr_multipliers=list(multipliers)), microbatch_size=64,
        trace_memory=False, seed=seed, entropy=EntropySpec(*kind),
        entropy_batch=None if g_e is None else EntropyBatchSpec(
            prompts=[POOL[i] for i in e_idx], responses_per_prompt=g_e))
    return run_probe(spec, cache=pool.cache), u_idx, e_idx


def _z_of_mean(errors: torch.Tensor) -> float:
    return float(errors.mean()) / (float(errors.std()) / math.sqrt(errors.numel()))


@pytest.mark.parametrize("g_e,kind", [(1, ("token_mean", "full_vocabulary")),
                                      (4, ("token_mean", "full_vocabulary")),
                                      (1, ("sequence", "sampled"))])
def test_two_batch_matches_exact_held_out_change_and_its_se_is_calibrated(pool, g_e, kind):
    norm, rows = kind[0], []
    for seed in range(SEEDS):
        out, _, e_idx = _run(pool, seed, g_e, kind)
        d, r = out.delta_h1, out.realized
        delta = out.step.delta
        exact_first = exact_first_order(pool, e_idx, norm, delta)             # ∇H_E·Δθ_U
        exact_h = float(entropy_of(norm, pool.h[e_idx], pool.t[e_idx]))
        _, est = r.main
        pool_first = exact_first_order(pool, list(range(len(POOL))), norm, delta)
        rows.append((d.total - exact_first, d.se, d.total - pool_first,
                     est.delta_h - exact_change(pool, e_idx, norm, delta), est.se,
                     r.h_before - exact_h, d.se_unconditional, exact_first))
        assert d.u_statistic is None and out.mode == "two_batch"
        assert out.units == E_SEQUENCES // g_e
        assert d.target == "held_out" and r.target == "held_out"
        assert out.entropy_batch.responses_per_prompt == g_e
    err, se, pool_err, r_err, r_se, h_err, se_unc, exact = (
        torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    # centred: the mean error over seeds is within 4 SE of its mean
    for e in (err, r_err, h_err):
        assert abs(_z_of_mean(e)) < 4, (g_e, float(e.mean()), float(e.std()))
    # calibrated: the reported SE matches the spread over seeds of the error against the
    # pool's change (the E prompts are draws from the pool, and the SE counts their spread;
    # against the drawn prompts' own change it would over-cover, as the first round's
    # balanced design did)
    ratio = float(se.pow(2).mean().sqrt() / pool_err.std())
    print(f"\nG_E={g_e} {kind}: δH₁ SE/SD = {ratio:.3f} (SD {float(pool_err.std()):.3e}); "
          f"ΔH SE/SD = {float(r_se.pow(2).mean().sqrt() / r_err.std()):.3f}")
    assert 0.8 <= ratio <= 1.25, ratio
    assert (se_unc >= se).all()
    if kind[1] == "full_vocabulary":
        # the test has power: a probe that answered 0 would be off by many SEs of the mean
        # error (the sampled estimator, 4× noisier here, is only held to centring and SE)
        assert abs(float(exact.mean())) > 4 * float(err.std()) / math.sqrt(SEEDS)


def test_two_batch_measures_the_held_out_change_where_single_batch_measures_in_sample(pool):
    """The audit's comparison at B = 8 with prompts drawn independently, on the same U step:
    the two-batch ΔH (SNIS on held-out responses) and δH₁ are centred on the exact change of
    the E prompts. The single-batch realized ΔH is compared with the exact change on fresh
    prompts (the pool's) and its excess is printed: in this 6-token world it is below what 24
    seeds resolve (the closing note of issue 14 gives the numbers), so it is reported, not
    asserted."""
    rows = []
    for seed in range(COMPARE_SEEDS):
        single, u_idx, _ = _run(pool, seed, None, lr=COMPARE_LR)
        double, _, e_idx = _run(pool, seed, 1, lr=COMPARE_LR)
        delta = single.step.delta
        torch.testing.assert_close(double.step.delta, delta)     # the same step from U
        everyone = list(range(len(POOL)))
        fresh = exact_change(pool, everyone, "token_mean", delta)       # T_pop
        rows.append((single.realized.main[1].delta_h - fresh,
                     double.realized.main[1].delta_h - exact_change(pool, e_idx, "token_mean",
                                                                    delta),
                     single.delta_h1.total - exact_first_order(pool, everyone, "token_mean",
                                                               delta),
                     double.delta_h1.total - exact_first_order(pool, e_idx, "token_mean",
                                                               delta),
                     fresh))
    single_excess, double_err, single_d1, double_d1, fresh = (
        torch.tensor(c, dtype=torch.float64) for c in zip(*rows))
    root = COMPARE_SEEDS ** .5
    print(f"\nT_pop {float(fresh.mean()):+.4f}; single-batch SNIS excess "
          f"{float(single_excess.mean()):+.4f} ± {float(single_excess.std()) / root:.4f};"
          f" two-batch ΔH error {float(double_err.mean()):+.4f} ± "
          f"{float(double_err.std()) / root:.4f}; SD of δH₁ error single "
          f"{float(single_d1.std()):.4e} two-batch {float(double_d1.std()):.4e}")
    assert abs(_z_of_mean(double_err)) < 4
    assert abs(_z_of_mean(double_d1)) < 4
    # the comparison has power: both two-batch errors are small next to the change itself
    assert float(double_err.std()) / root < 0.25 * abs(float(fresh.mean()))


def test_a_two_batch_request_maps_onto_a_valid_result(pool):
    """The wire path: ProbeRequest → spec → run → ProbeResult (strict JSON), with the summary."""
    from schemas import ProbeRequest
    from service.mapping import to_result, to_spec
    from service.summary import summarize

    req = ProbeRequest.model_validate({
        "checkpoint": {"base_model": pool.base, "adapter": pool.adapter},
        "prompts": POOL[:4], "answers": ["a"] * 4, "responses_per_prompt": 3,
        "generation": {"max_new_tokens": MAX_NEW},
        "entropy_batch": {"prompts": POOL[4:10], "responses_per_prompt": 2},
        "realized": {"lr_multipliers": [1.0, 0.5]}})
    spec = to_spec(req, host_budget_bytes=1 << 30)
    result = to_result(run_probe(spec, cache=pool.cache), spec.checkpoint)
    body = result.model_dump(mode="json")
    assert body["delta_h1"]["mode"] == "two_batch" and body["delta_h1"]["units"] == 6
    assert body["delta_h1"]["u_statistic"] is None
    assert body["delta_h1"]["target"] == "held_out"
    assert body["delta_h1"]["se_unconditional"] >= body["delta_h1"]["se"] > 0
    assert body["realized"]["target"] == "held_out"
    assert body["entropy_batch"] == {"num_prompts": 6, "responses_per_prompt": 2,
                                     "mean_response_tokens": body["entropy_batch"]
                                     ["mean_response_tokens"]}
    for row in body["realized"]["by_lr_multiplier"]:
        c = row["curvature"]
        assert c["value"] == pytest.approx(row["delta_h"] - row["delta_h1"], abs=1e-12)
        assert c["se"] is not None and c["se"] >= 0
    # the U batch (4×3) skips the full-vocabulary backward: its own X is not needed
    assert body["passes"]["backward"] == 4 * 3 * 1 + 6 * 2 * 2
    assert body["passes"]["forward_grad"] == 4 * 3 + 6 * 2
    text = summarize(result)
    assert "held-out E batch 6 prompts × 2" in text and "target held out" in text


def test_single_batch_results_say_what_they_target_and_warn_below_64_prompts(pool):
    out, _, _ = _run(pool, 0, None)
    assert out.delta_h1.target == "fresh_prompts"
    assert out.realized.target == "batch_in_sample"
    assert any("< 64" in w and "entropy_batch" in w for w in out.warnings)
