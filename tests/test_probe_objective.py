"""The step the probe takes is the step TRL's losses take (issue 15): for each TRL loss_type and
scale_rewards, with and without TRL's entropy bonus, the saved updated adapter equals one real
torch.optim.AdamW step on the loss written out token by token as TRL's GRPOTrainer aggregates it
(brute force, autograd)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from exact_world import adamw_delta, flat_grad, load_policy, token_terms
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, ClientRollout, EntropySpec, GenerationSpec,
                             ObjectiveSpec, ProbeSpec, RealizedSpec)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

G = 4
MAX_NEW = 6
PROMPTS = ["1+2=", "13+4=", "7-3=", "2+2=?", "9:3="]
RESPONSES = [["3", "12", "3 3", "33+1"], ["17", "1", "7", "17 7"], ["4", "10", "4 4", "4"],
             ["4", "5", "22", "4+0=4"], ["3", "27", "3", "1"]]
REWARDS = [[1, 0, 0, 0.5], [1, 1, 0, 0], [1, 0, 0.5, 1], [1, 0, 0, 0.2], [0, 0, 1, 1]]
TRL_EPS = 1e-4
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    return write_tiny_checkpoint(str(root), TinyConfig(init_std=0.1, train_steps=4))


def _rollouts(tok) -> list[ClientRollout]:
    eos = tok.eos_token_id
    return [ClientRollout(p, [tok.encode(r) + ([eos] if k % 2 == 0 else [])
                              for k, r in enumerate(resps)], [float(x) for x in rew])
            for p, resps, rew in zip(PROMPTS, RESPONSES, REWARDS)]


def _trl_advantages(rewards: torch.Tensor, scale_rewards: str) -> torch.Tensor:
    """grpo_trainer._generate_and_score_completions: centred per group, then divided by the
    group's or the batch's Bessel std + 1e-4 (or not at all)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale_rewards == "group":
        return centred / (rewards.std(1, keepdim=True) + TRL_EPS)
    if scale_rewards == "batch":
        return centred / (rewards.std() + TRL_EPS)
    return centred


def _trl_loss(loss_type: str, logps: list[torch.Tensor], adv: torch.Tensor) -> torch.Tensor:
    """grpo_trainer._compute_loss on one batch (one micro-batch, num_iterations = 1, β = 0):
    per-token loss −exp(lp − sg(lp))·A, aggregated as loss_type does."""
    per_seq = [-(torch.exp(lp - lp.detach()) * a) for lp, a in zip(logps, adv.reshape(-1))]
    tokens = sum(len(x) for x in per_seq)
    if loss_type == "grpo":        # mean over sequences of the per-sequence token mean
        return torch.stack([x.sum() / len(x) for x in per_seq]).mean()
    if loss_type == "dr_grpo":     # Σ tokens / (sequences · max_completion_length)
        return torch.stack([x.sum() for x in per_seq]).sum() / (len(per_seq) * MAX_NEW)
    if loss_type in ("dapo", "bnpo"):   # Σ tokens / tokens in the batch
        return torch.stack([x.sum() for x in per_seq]).sum() / tokens
    raise ValueError(loss_type)


OBJECTIVES = {   # loss_type → the probe's objective (README, "TRL and verl losses")
    "dapo": dict(length_norm="token_mean"),
    "bnpo": dict(length_norm="token_mean"),
    "grpo": dict(length_norm="per_sequence"),
    "dr_grpo": dict(length_norm="constant", length_norm_constant=float(MAX_NEW)),
}
ADVANTAGES = {"group": dict(advantage="standardized", advantage_eps=TRL_EPS),
              "batch": dict(advantage="batch_standardized"),
              "none": dict(advantage="mean_centered")}


@pytest.mark.parametrize("loss_type,scale_rewards,clip,coef,estimator", [
    ("dapo", "group", None, 0.0, "full_vocabulary"), ("dapo", "batch", 1e-3, 0.0, "sampled"),
    ("bnpo", "none", None, 0.0, "full_vocabulary"), ("grpo", "group", None, 0.0, "sampled"),
    ("dr_grpo", "batch", None, 0.0, "full_vocabulary"),
    # TRL's entropy bonus, with either entropy estimator measured (the bonus is always the
    # token-mean full-vocabulary entropy through the logits)
    ("dapo", "group", None, 0.3, "full_vocabulary"), ("grpo", "none", 1e-3, 0.3, "sampled"),
    ("dapo", "batch", None, -0.2, "sampled")])
def test_saved_step_is_adamw_on_trls_loss(ckpt, tmp_path, loss_type, scale_rewards, clip, coef,
                                          estimator):
    base, adapter = ckpt
    model, tok, params = load_policy(base, adapter)
    rollouts = _rollouts(tok)
    saved = str(tmp_path / "stepped")
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts,
                     reward_kind="provided", responses_per_prompt=G,
                     generation=GenerationSpec(max_new_tokens=MAX_NEW, temperature=TEMPERATURE),
                     objective=ObjectiveSpec(**OBJECTIVES[loss_type],
                                             **ADVANTAGES[scale_rewards], entropy_coef=coef),
                     entropy=EntropySpec(estimator=estimator),
                     max_grad_norm=clip, realized=RealizedSpec(enabled=False),
                     save_updated_adapter_to=saved)
    out = run_probe(spec)

    terms = [token_terms(model, tok(r.prompt, add_special_tokens=False)["input_ids"], resp,
                         TEMPERATURE) for r in rollouts for resp in r.responses]
    logps = [lp for lp, _ in terms]
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
    loss = _trl_loss(loss_type, logps, _trl_advantages(rewards, scale_rewards))
    # grpo_trainer: loss − entropy_coef · Σ_tokens h / tokens (through the logits only)
    loss = loss - coef * torch.cat([h for _, h in terms]).sum() / sum(len(h) for _, h in terms)
    sd = torch.load(f"{adapter}/optimizer.pt", weights_only=True)
    want = adamw_delta(params, sd, loss, clip)
    theta = torch.cat([p.detach().reshape(-1).double() for p in params])
    got = torch.cat([p.detach().reshape(-1).double()
                     for p in load_policy(base, saved)[2]]) - theta
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(out.step.delta, want, rtol=1e-4, atol=2e-7)
    if clip is not None:
        assert out.optimizer.clip_factor < 1.0     # the clipped branch was exercised
    n_seq = len(PROMPTS) * G                       # one more backward only for the bonus
    assert out.passes.backward == n_seq * (1 + (estimator == "full_vocabulary") + (coef != 0))
    assert (out.reward.entropy_bonus_term != 0) == (coef != 0)


def test_reward_side_is_the_same_when_units_are_recomputed(ckpt):
    """Over the host budget the unit vectors are recomputed for their dots: δJ₁, the bonus
    term, the exchange rate and the coefficient for a target come out the same."""
    base, adapter = ckpt
    tok = load_policy(base, adapter)[1]

    def probe(budget: int):
        spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=_rollouts(tok),
                         reward_kind="provided", responses_per_prompt=G,
                         generation=GenerationSpec(max_new_tokens=MAX_NEW),
                         objective=ObjectiveSpec(length_norm="token_mean", entropy_coef=0.3,
                                                 target_delta_h=0.0),
                         realized=RealizedSpec(enabled=False), host_budget_bytes=budget)
        return run_probe(spec)

    kept, streamed = probe(8 << 30), probe(0)
    assert kept.unit_x is not None and streamed.unit_x is None
    a, b = kept.reward, streamed.reward
    for x, y in [(a.delta_j1.total, b.delta_j1.total), (a.delta_j1.se, b.delta_j1.se),
                 (a.delta_j1.entropy_bonus_term, b.delta_j1.entropy_bonus_term),
                 (a.entropy_bonus_term, b.entropy_bonus_term),
                 (kept.delta_h1.gradient_term, streamed.delta_h1.gradient_term),
                 (kept.delta_h1.total, streamed.delta_h1.total)]:
        assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-12), (x, y)
    assert (a.entropy_coef_for_target is None) == (b.entropy_coef_for_target is None)
    if a.entropy_coef_for_target is not None:
        assert math.isclose(a.entropy_coef_for_target.value, b.entropy_coef_for_target.value,
                            rel_tol=1e-5)
    assert a.entropy_bonus_term != 0.0


def test_nulls_when_the_step_is_zero(ckpt):
    """lr 0: δJ₁ = 0, so no exchange rate; the bonus slope is 0, so no coefficient for a
    target (rather than a division by zero)."""
    base, adapter = ckpt
    tok = load_policy(base, adapter)[1]
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=_rollouts(tok),
                     reward_kind="provided", responses_per_prompt=G,
                     generation=GenerationSpec(max_new_tokens=MAX_NEW), lr_override=0.0,
                     objective=ObjectiveSpec(entropy_coef=0.3, target_delta_h=0.01),
                     realized=RealizedSpec(enabled=False))
    out = run_probe(spec)
    assert out.reward.delta_j1.total == 0.0 and out.reward.exchange_rate is None
    assert out.reward.entropy_coef_for_target is None and out.reward.entropy_bonus_term == 0.0


def test_delta_j1_equals_brute_force_from_per_sequence_gradients(ckpt):
    """δJ₁ and its bonus part from explicit per-sequence gradients (autograd, one sequence at
    a time): Z_u = Σ_g (R_g − R̄_{−g})/G ∇S_g, Y_u + c·s·P_u, the U-statistic over ordered
    pairs of different units, with the probe's own step (D, κ)."""
    base, adapter = ckpt
    model, tok, params = load_policy(base, adapter)
    rollouts, coef = _rollouts(tok), 0.3
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts,
                     reward_kind="provided", responses_per_prompt=G,
                     generation=GenerationSpec(max_new_tokens=MAX_NEW),
                     objective=ObjectiveSpec(length_norm="token_mean", entropy_coef=coef),
                     realized=RealizedSpec(enabled=False))
    out = run_probe(spec)
    grads_s, grads_e, lengths = [], [], []
    for r in rollouts:
        prompt = tok(r.prompt, add_special_tokens=False)["input_ids"]
        for resp in r.responses:
            grads_s.append(flat_grad(token_terms(model, prompt, resp)[0].sum(), params))
            grads_e.append(flat_grad(token_terms(model, prompt, resp)[1].sum(), params))
            lengths.append(len(resp))
    b = len(rollouts)
    gs, ge = torch.stack(grads_s).view(b, G, -1), torch.stack(grads_e).view(b, G, -1)
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
    c_z = (rewards - (rewards.sum(1, keepdim=True) - rewards) / (G - 1)) / G
    c_y = (rewards - rewards.mean(1, keepdim=True)) / (G * (sum(lengths) / (b * G)))
    scale = b / sum(lengths)                                   # TRL's bonus: s·P̄, s = B/T_tot
    z = (c_z[..., None] * gs).sum(1)                                           # [B, P]
    p = ge.sum(1)
    y = (c_y[..., None] * gs).sum(1) + coef * scale * p
    step = out.step

    def u_cross(a, w, v):
        pairs = list(itertools.permutations(range(b), 2))
        return sum(float(a[i] @ (w * v[j])) for i, j in pairs) / len(pairs)

    grad_term = step.kappa * u_cross(z, step.w_grad, y)
    bonus = step.kappa * coef * scale * u_cross(z, step.w_grad, p)
    total = grad_term - float((z @ step.w_momentum).mean()) - float((z @ step.w_decay).mean())
    d = out.reward.delta_j1
    close = dict(rel_tol=2e-4, abs_tol=1e-10)
    assert math.isclose(d.total, total, **close), (d.total, total)
    assert math.isclose(d.entropy_bonus_term, bonus, **close), (d.entropy_bonus_term, bonus)
    assert math.isclose(d.gradient_term, grad_term - bonus, **close)
    assert d.informative_units == int((rewards != rewards[:, :1]).any(1).sum())
