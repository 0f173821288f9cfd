"""The probe's unit summaries equal a brute-force computation from per-token gradients, for the
four entropy kinds (issue 13), and the default estimator's memory does not grow with B or G.

Brute force: every sequence unbatched, a plain full-vocabulary log_softmax, and autograd of each
token's log π(y_k | y_<k) and h_k separately; X_n, N_n, Y_n and the batch scalars are then
formed by the formulas of docs/method.md, term by term.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from exact_world import load_policy, token_terms
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, ClientRollout, EntropySpec, EstimatorSpec,
                             GenerationSpec, ProbeSpec, RealizedSpec)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

G, MAX_NEW, B = 3, 7, 5
KINDS = [EntropySpec(n, e) for n in ("token_mean", "sequence")
         for e in ("full_vocabulary", "sampled")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("brute")
    return write_tiny_checkpoint(str(root), TinyConfig(init_std=0.1, train_steps=4))


def _rollouts(tok, num_prompts: int, group: int, max_new: int, seed: int = 0,
              fixed_length: bool = False) -> list[ClientRollout]:
    """Random token responses, some ending in EOS, of different lengths."""
    rng = random.Random(seed)
    eos, vocab = tok.eos_token_id, len(tok)
    out = []
    for n in range(num_prompts):
        resp = []
        for g in range(group):
            length = max_new if fixed_length else rng.randint(1, max_new)
            ids = [rng.randrange(2, vocab) for _ in range(length)]
            if (n + g) % 2 and not fixed_length:
                ids[-1] = eos
            resp.append(ids)
        out.append(ClientRollout("ab+" * (1 + n % 3) + str(n), resp,
                                 [float(rng.random() < 0.5) for _ in range(group)]))
    return out


def _grad(value: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


class BruteForce:
    """Per-token gradients of every sequence and the summaries built from them."""

    def __init__(self, ckpt, rollouts: list[ClientRollout], temperature: float):
        base, adapter = ckpt
        model, tok, params = load_policy(base, adapter)
        seqs = []
        for r in rollouts:
            prompt = tok(r.prompt, add_special_tokens=False)["input_ids"]
            for resp in r.responses:
                lp, h = token_terms(model, prompt, resp, temperature)            # [L] each
                grads_lp = [_grad(lp[k], params) for k in range(len(resp))]
                grads_h = [_grad(h[k], params) for k in range(len(resp))]
                seqs.append((lp.detach(), h.detach(), grads_lp, grads_h))
        self.seqs, self.rollouts = seqs, rollouts

    def summaries(self, kind: EntropySpec, per_unit: int, max_new: int):
        """X_u [U, P], Y_u [U, P] and the sequences' f, T."""
        f, t, s, x_seq, n_len, y = [], [], [], [], [], []
        for n, r in enumerate(self.rollouts):
            rows = self.seqs[n * G:(n + 1) * G]
            grad_s = [sum(gl) for _, _, gl, _ in rows]                           # ∇S_g
            s_n = torch.stack([lp.sum() for lp, _, _, _ in rows])
            t_n = torch.tensor([float(len(lp)) for lp, _, _, _ in rows], dtype=torch.float64)
            if kind.estimator == "sampled":
                f_n = -s_n
                terms = [-(s_n[g] - (s_n.sum() - s_n[g]) / (G - 1)) / G * grad_s[g]
                         for g in range(G)]
                x = -sum(terms)
            else:
                f_n = torch.stack([h.sum() for _, h, _, _ in rows])
                to_go = [h.flip(0).cumsum(0).flip(0) - h for _, h, _, _ in rows]  # Γ_k
                m = torch.stack([gam.mean() for gam in to_go])
                x = 0
                for g, (lp, h, gl, gh) in enumerate(rows):
                    beta = (m.sum() - m[g]) / (G - 1)
                    x = x - (sum(gh) + sum((to_go[g][k] - beta) * gl[k]
                                           for k in range(len(gl)))) / G
            n_len.append(sum((t_n[g] - (t_n.sum() - t_n[g]) / (G - 1)) / G * grad_s[g]
                             for g in range(G)))
            adv = torch.tensor(r.rewards, dtype=torch.float64)
            adv = adv - adv.mean()
            y.append(sum(adv[g] / (G * max_new) * grad_s[g] for g in range(G)))
            x_seq.append(x)
            f.append(f_n)
            t.append(t_n)
            s.append(s_n)
        f, t = torch.cat(f), torch.cat(t)
        x_seq, n_len, y = torch.stack(x_seq), torch.stack(n_len), torch.stack(y)
        if kind.normalization == "token_mean":
            x_seq = (x_seq + float(f.sum() / t.sum()) * n_len) / float(t.mean())
        units = lambda v: v.view(-1, per_unit, v.shape[-1]).mean(1)           # noqa: E731
        return units(x_seq), units(y), f, t


@pytest.fixture(scope="module")
def brute_force(ckpt):
    """BruteForce by number of prompts, built once each."""
    built = {}

    def get(rollouts, temperature):
        if len(rollouts) not in built:
            built[len(rollouts)] = BruteForce(ckpt, rollouts, temperature)
        return built[len(rollouts)]
    return get


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"{k.normalization}-{k.estimator}")
@pytest.mark.parametrize("mode,microbatch", [("exact", 2), ("blocks", 3)], ids=["exact", "blocks"])
def test_unit_summaries_equal_brute_force(ckpt, brute_force, kind, mode, microbatch):
    """The probe's X_u and Y_u (and h_before) equal the brute-force ones, with chunks that
    split a prompt's responses."""
    base, adapter = ckpt
    tok = load_policy(base, None)[1]
    rollouts = _rollouts(tok, B if mode == "exact" else B - 1, G, MAX_NEW)
    per_unit = 1 if mode == "exact" else 2
    temperature = 0.8
    bf = brute_force(rollouts, temperature)
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=rollouts,
                     reward_kind="provided", responses_per_prompt=G, entropy=kind,
                     generation=GenerationSpec(max_new_tokens=MAX_NEW, temperature=temperature),
                     estimator=EstimatorSpec(mode=mode, block_size=per_unit),
                     realized=RealizedSpec(lr_multipliers=[1.0]), microbatch_size=microbatch)
    out = run_probe(spec)
    x, y, f, t = bf.summaries(kind, per_unit, MAX_NEW)
    scale_x, scale_y = float(x.abs().max()), float(y.abs().max())
    torch.testing.assert_close(out.unit_x.double(), x, rtol=1e-4, atol=1e-5 * scale_x)
    torch.testing.assert_close(out.unit_y.double(), y, rtol=1e-4, atol=1e-5 * scale_y)
    want_h = float(f.sum() / t.sum()) if kind.normalization == "token_mean" else float(f.mean())
    assert abs(out.realized.h_before - want_h) < 1e-5 * abs(want_h)
    per_seq = 1 if kind.estimator == "sampled" else 2
    n_seq = len(rollouts) * G
    assert (out.passes.forward_grad, out.passes.backward, out.passes.forward_no_grad) == \
        (n_seq, per_seq * n_seq, n_seq)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_default_estimator_memory_is_flat_in_batch_and_group(tmp_path):
    """With the default entropy kind (token_mean, full_vocabulary) and unit vectors not kept
    (host_budget_bytes=0: they are the one store meant to grow with B, bounded by the budget),
    no tensor the probe creates grows with B or G: the largest is one unit's accumulator or one
    chunk's logits. (A 512-token vocabulary, so that logits of all tokens of the batch, or a
    [U, P] stack, would be larger than either.)"""
    base, adapter = write_tiny_checkpoint(str(tmp_path), TinyConfig(vocab_size=512,
                                                                    train_steps=1))
    tok = load_policy(base, None)[1]
    largest = {}
    for b, g in ((4, 4), (16, 4), (4, 8)):
        spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), reward_kind="provided",
                         rollouts=_rollouts(tok, b, g, 6, seed=b + g, fixed_length=True),
                         responses_per_prompt=g, generation=GenerationSpec(max_new_tokens=6),
                         realized=RealizedSpec(lr_multipliers=[1.0]), microbatch_size=2,
                         host_budget_bytes=0)
        with _LargestTensor() as mode:
            out = run_probe(spec)
        assert out.entropy.estimator == "full_vocabulary"
        largest[(b, g)] = mode.largest
    print(f"\nlargest tensor (bytes) by (B, G): {largest}")
    assert largest[(16, 4)] == largest[(4, 4)] and largest[(4, 8)] == largest[(4, 4)]
