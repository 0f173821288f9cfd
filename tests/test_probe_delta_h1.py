"""δH₁ held to a brute-force computation from explicit per-sequence gradients (issue 3), and the
AdamW step held to torch.optim.AdamW itself."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from exact_world import flat_grad, load_policy, sequence_logprob
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, ClientRollout, EntropySpec, EstimatorSpec,
                             GenerationSpec, ProbeSpec, RealizedSpec)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

FIRST_ROUND = EntropySpec(normalization="sequence", estimator="sampled")

G = 3
MAX_NEW = 10
PROMPTS = ["1+2=", "13+4=", "7-3=", "2+2=?", "9:3=", "5+5="]
RESPONSES = [["3", "12", "3 "], ["17", "17", "7"], ["4", "10", "4 4"],
             ["4", "5", "22"], ["3", "27", "3"], ["10", "1", "55"]]
REWARDS = [[1, 0, 0], [1, 1, 0], [1, 0, 0.5], [1, 0, 0], [1, 0, 1], [1, 0, 0]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("dh1")
    base, adapter = write_tiny_checkpoint(str(root), TinyConfig(init_std=0.1, train_steps=4))
    return str(root), base, adapter


def _rollouts(tok) -> list[ClientRollout]:
    eos = tok.eos_token_id
    out = []
    for p, resps, rew in zip(PROMPTS, RESPONSES, REWARDS):
        ids = [tok.encode(r) + ([eos] if k % 2 == 0 else []) for k, r in enumerate(resps)]
        out.append(ClientRollout(p, ids, [float(x) for x in rew]))
    return out


def _spec(ckpt, tok, *, mode="exact", block=2, clip=None, save=None) -> ProbeSpec:
    root, base, adapter = ckpt
    return ProbeSpec(
        checkpoint=CheckpointSpec(base, adapter), entropy=FIRST_ROUND,
        rollouts=_rollouts(tok), reward_kind="provided",
        responses_per_prompt=G, generation=GenerationSpec(max_new_tokens=MAX_NEW),
        estimator=EstimatorSpec(mode=mode, block_size=block), max_grad_norm=clip,
        microbatch_size=2, realized=RealizedSpec(lr_multipliers=[1.0]),
        save_updated_adapter_to=save)


class BruteForce:
    """Every quantity of DESIGN.md computed directly from per-sequence gradient vectors."""

    def __init__(self, ckpt, per_unit: int, clip: float | None, optimizer: str | None = None):
        _, base, adapter = ckpt
        model, tok, params = load_policy(base, adapter)
        self.params = params
        self.theta = torch.cat([p.detach().reshape(-1).double() for p in params])
        rollouts = _rollouts(tok)
        s, grads = [], []
        for r in rollouts:
            prompt = tok(r.prompt, add_special_tokens=False)["input_ids"]
            for resp in r.responses:
                value = sequence_logprob(model, prompt, resp)
                s.append(value.detach())
                grads.append(flat_grad(value, params))
        s = torch.stack(s).view(len(rollouts), G)                            # [B, G]
        grads = torch.stack(grads).view(len(rollouts), G, -1)                # [B, G, P]
        rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
        adv = rewards - rewards.mean(1, keepdim=True)
        c_y = adv / (G * MAX_NEW)
        c_x = torch.stack([(s[:, g] - (s.sum(1) - s[:, g]) / (G - 1)) / G for g in range(G)], 1)
        x_n = (c_x[..., None] * grads).sum(1)                                # [B, P]
        y_n = (c_y[..., None] * grads).sum(1)
        self.x = x_n.view(-1, per_unit, x_n.shape[-1]).mean(1)               # [U, P]
        self.y = y_n.view(-1, per_unit, y_n.shape[-1]).mean(1)
        self.sd = torch.load(optimizer or f"{adapter}/optimizer.pt", weights_only=True)
        # per-element hyper-parameters: group k's values for group k's parameters
        hyper = {k: [] for k in ("lr", "b1", "b2", "eps", "wd", "t")}
        ms, vs = [], []
        for grp in self.sd["param_groups"]:
            for i in grp["params"]:
                st, n = self.sd["state"][i], params[i].numel()
                for key, val in (("lr", grp["lr"]), ("b1", grp["betas"][0]),
                                 ("b2", grp["betas"][1]), ("eps", grp["eps"]),
                                 ("wd", grp["weight_decay"]), ("t", float(st["step"]))):
                    hyper[key].append(torch.full((n,), float(val), dtype=torch.float64))
                ms.append(st["exp_avg"].reshape(-1).double())
                vs.append(st["exp_avg_sq"].reshape(-1).double())
        h = {k: torch.cat(v) for k, v in hyper.items()}
        self.lr, self.b1, self.wd = h["lr"], h["b1"], h["wd"]
        self.m, v = torch.cat(ms), torch.cat(vs)
        y_bar = self.y.mean(0)
        self.kappa = 1.0 if clip is None else min(1.0, clip / (float(y_bar.norm()) + 1e-6))
        g = -self.kappa * y_bar
        t = h["t"] + 1
        v1 = h["b2"] * v + (1 - h["b2"]) * g * g
        bc1, bc2 = 1 - self.b1 ** t, 1 - h["b2"] ** t
        self.d = 1 / (bc1 * (v1.sqrt() / bc2.sqrt() + h["eps"]))
        self.w = self.lr * (1 - self.b1) * self.d         # weight of κȲ in Δθ
        self.delta = (self.kappa * self.w * y_bar - self.lr * self.b1 * self.d * self.m
                      - self.lr * self.wd * self.theta)

    def u_cross(self, units: list[int], w: torch.Tensor | None = None) -> float:
        w = self.d if w is None else w
        pairs = list(itertools.permutations(units, 2))
        return sum(float(self.x[u] @ (w * self.y[v])) for u, v in pairs) / len(pairs)

    def total(self, units: list[int]) -> float:
        x_bar = self.x[units].mean(0)
        return (-self.kappa * self.u_cross(units, self.w)
                + float(x_bar @ (self.lr * self.b1 * self.d * self.m))
                + float(x_bar @ (self.lr * self.wd * self.theta)))

    def torch_adamw_delta(self) -> torch.Tensor:
        """Δθ of a real torch.optim.AdamW step with the gradient g = −κȲ."""
        opt = torch.optim.AdamW([{"params": [self.params[i] for i in grp["params"]]}
                                 for grp in self.sd["param_groups"]])
        opt.load_state_dict(self.sd)
        g = -self.kappa * self.y.mean(0)
        off = 0
        for p in self.params:
            p.grad = g[off:off + p.numel()].view(p.shape).float()
            off += p.numel()
        opt.step()
        after = torch.cat([p.detach().reshape(-1).double() for p in self.params])
        return after - self.theta


@pytest.mark.parametrize("mode,block,clip", [("exact", 1, None), ("blocks", 2, None),
                                             ("exact", 1, 1e-3)])
def test_delta_h1_equals_brute_force(ckpt, tmp_path, mode, block, clip):
    bf = BruteForce(ckpt, block, clip)
    tok = load_policy(ckpt[1], None)[1]
    saved = str(tmp_path / "stepped")
    out = run_probe(_spec(ckpt, tok, mode=mode, block=block, clip=clip, save=saved))
    units = list(range(bf.x.shape[0]))
    u = len(units)
    assert out.units == u
    d = out.delta_h1
    close = dict(rel_tol=2e-4, abs_tol=1e-9)
    x_bar, y_bar = bf.x.mean(0), bf.y.mean(0)
    # U-statistic pieces (with W = D)
    assert math.isclose(d.u_statistic.value, bf.u_cross(units), **close)
    assert math.isclose(d.u_statistic.bars_dot, float(x_bar @ (bf.d * y_bar)), **close)
    assert math.isclose(d.u_statistic.diag_sum,
                        sum(float(bf.x[k] @ (bf.d * bf.y[k])) for k in units), **close)
    # the three terms and the total
    _check_terms(bf, d, units, close)
    assert math.isclose(d.total, bf.total(units), **close)
    assert math.isclose(out.optimizer.clip_factor, bf.kappa, rel_tol=1e-5)
    # jackknife by literally deleting each unit; plug-in ζ̂₁ from the row means
    loo = torch.tensor([bf.total([w for w in units if w != k]) for k in units])
    se_jk = math.sqrt((u - 1) / u * float(((loo - loo.mean()) ** 2).sum()))
    assert math.isclose(d.se, se_jk, rel_tol=1e-3)
    rows = [sum(float(bf.x[k] @ (bf.d * bf.y[w]) + bf.x[w] @ (bf.d * bf.y[k]))
                for w in units if w != k) / (2 * (u - 1)) for k in units]
    zeta1 = sum((r - bf.u_cross(units)) ** 2 for r in rows) / (u - 1)
    assert math.isclose(d.u_statistic.zeta1_plugin, zeta1, rel_tol=1e-3)
    assert math.isclose(d.u_statistic.se_plugin, math.sqrt(4 * zeta1 / u), rel_tol=1e-3)
    # the step actually taken is torch's AdamW step
    stepped = torch.cat([p.detach().reshape(-1).double()
                         for p in load_policy(ckpt[1], saved)[2]])
    torch.testing.assert_close(stepped - bf.theta, bf.delta, rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(bf.torch_adamw_delta(), bf.delta, rtol=1e-4, atol=2e-7)
    # pass schedule: per sequence 1 grad forward, 1 backward (hooks, sampled), 1 no-grad
    # forward per lr multiplier (S comes from the gradient forward)
    n_seq = len(PROMPTS) * G
    assert (out.passes.forward_grad, out.passes.forward_no_grad) == (n_seq, n_seq)
    assert out.passes.backward == n_seq


def test_naive_preconditioner_is_not_the_adamw_step(ckpt):
    """The older habit −lr·X̄·PȲ with P = 1/(√v+ε) (no bias correction, no (1−β1), no momentum)
    is not the first-order change along the step AdamW takes; δH₁'s plug-in form is, exactly."""
    bf = BruteForce(ckpt, 1, None)
    x_bar, y_bar = bf.x.mean(0), bf.y.mean(0)
    along_step = -float(x_bar @ bf.torch_adamw_delta())
    plug_in = (-float(x_bar @ (bf.w * y_bar)) + float(x_bar @ (bf.lr * bf.b1 * bf.d * bf.m))
               + float(x_bar @ (bf.lr * bf.wd * bf.theta)))
    v = torch.cat([bf.sd["state"][i]["exp_avg_sq"].reshape(-1).double()
                   for i in range(len(bf.params))])
    naive = -float(x_bar @ (bf.lr * y_bar / (v.sqrt() + 1e-8)))
    assert math.isclose(plug_in, along_step, rel_tol=1e-4)
    assert abs(naive - along_step) > 0.5 * abs(along_step)


def _check_terms(bf: BruteForce, d, units: list[int], close: dict) -> None:
    x_bar = bf.x.mean(0)
    assert math.isclose(d.gradient_term, -bf.kappa * bf.u_cross(units, bf.w), **close)
    assert math.isclose(d.momentum_term, float(x_bar @ (bf.lr * bf.b1 * bf.d * bf.m)), **close)
    assert math.isclose(d.weight_decay_term, float(x_bar @ (bf.lr * bf.wd * bf.theta)), **close)
    assert math.isclose(d.total, bf.total(units), **close)


def test_two_param_groups_fold_hyperparameters_per_element(ckpt, tmp_path):
    """An optimizer state split in two groups with different lr/wd/betas: each group's
    hyper-parameters apply to its own parameters, in δH₁ and in the step taken."""
    root, base, adapter = ckpt
    sd = torch.load(f"{adapter}/optimizer.pt", weights_only=True)
    n = len(sd["state"])
    g0 = dict(sd["param_groups"][0], params=list(range(n // 2)))
    g1 = dict(sd["param_groups"][0], params=list(range(n // 2, n)), lr=3e-3, weight_decay=0.0,
              betas=(0.8, 0.99))
    sd["param_groups"] = [g0, g1]
    opt_path = str(tmp_path / "opt2.pt")
    torch.save(sd, opt_path)
    tok = load_policy(base, None)[1]
    spec = _spec(ckpt, tok, save=str(tmp_path / "stepped2"))
    spec.checkpoint.optimizer = opt_path
    out = run_probe(spec)
    assert out.optimizer.param_groups == 2
    bf = BruteForce(ckpt, 1, None, optimizer=opt_path)
    _check_terms(bf, out.delta_h1, list(range(bf.x.shape[0])), dict(rel_tol=2e-4,
                                                                    abs_tol=1e-9))
    got = torch.cat([p.detach().reshape(-1).double()
                     for p in load_policy(base, str(tmp_path / "stepped2"))[2]]) - bf.theta
    torch.testing.assert_close(got, bf.delta, rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(bf.torch_adamw_delta(), bf.delta, rtol=1e-4, atol=2e-7)


def test_over_host_budget_recomputes_units_with_the_same_numbers(ckpt):
    """With no host budget for unit vectors a second gradient pass recomputes them: the numbers
    are the same and the extra pass is counted."""
    tok = load_policy(ckpt[1], None)[1]
    kept = run_probe(_spec(ckpt, tok))
    spec = _spec(ckpt, tok)
    spec.host_budget_bytes = 0
    streamed = run_probe(spec)
    assert streamed.unit_x is None and kept.unit_x is not None
    for field in ("total", "se", "gradient_term", "momentum_term", "weight_decay_term"):
        assert math.isclose(getattr(streamed.delta_h1, field), getattr(kept.delta_h1, field),
                            rel_tol=1e-6, abs_tol=1e-12)
    assert streamed.passes.forward_grad == 2 * kept.passes.forward_grad
    assert any("second gradient pass" in w for w in streamed.warnings)
