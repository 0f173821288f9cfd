"""The realized block: PSIS k̂ on known tails, extreme steps, s = 0, restoration (issue 4)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from exact_world import load_policy
from probe_core.checkpoint import ModelCache
from probe_core.importance import EntropySample, psis_k, snis
from probe_core.probe import run_probe
from probe_core.spec import CheckpointSpec, GenerationSpec, ProbeSpec, RealizedSpec
from probe_core.tiny import TinyConfig, write_tiny_checkpoint
from service.mapping import to_result


@pytest.mark.parametrize("alpha", [1 / 0.3, 2.0, 1 / 0.8, 1.0 / 1.2])
def test_psis_k_recovers_known_pareto_tail(alpha):
    """Weights w = U^(−1/α) follow a Pareto(α) law, whose generalized-Pareto shape is k = 1/α."""
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(20000, generator=gen, dtype=torch.float64)
    k = psis_k(-torch.log(u) / alpha)
    assert abs(k - 1 / alpha) < 0.1, (k, 1 / alpha)


def test_psis_k_is_small_for_light_tails_and_none_for_equal_weights():
    gen = torch.Generator().manual_seed(2)
    assert psis_k(0.1 * torch.randn(5000, generator=gen, dtype=torch.float64)) < 0.3
    assert psis_k(torch.zeros(1000)) is None


def _samples(s, s_after, value, value_after, length):
    return (EntropySample(value=value, length=length, log_weight=torch.zeros_like(s)),
            EntropySample(value=value_after, length=length, log_weight=s_after - s))


def test_snis_matches_direct_ratio_and_normalizations():
    """Sequence + sampled (f = −S, L = 1) is the first round's −Σŵ S⁺; token_mean with
    full-vocabulary values is Σ w f⁺ / Σ w T; per_prompt is the ratio of prompt means."""
    gen = torch.Generator().manual_seed(3)
    s = -3 + torch.randn(8, 5, generator=gen, dtype=torch.float64)
    s_after = s + 0.2 * torch.randn(8, 5, generator=gen, dtype=torch.float64)
    w = torch.exp(s_after - s)
    ones = torch.ones_like(s)
    glob = snis(*_samples(s, s_after, -s, -s_after, ones), "global", psis=True)
    assert math.isclose(glob.h_after, float(-(w * s_after).sum() / w.sum()), rel_tol=1e-12)
    assert math.isclose(glob.delta_h, glob.h_after + float(s.mean()), rel_tol=1e-12)
    assert math.isclose(glob.ess, float(w.sum() ** 2 / (w * w).sum()), rel_tol=1e-12)
    per = snis(*_samples(s, s_after, -s, -s_after, ones), "per_prompt", psis=False)
    want = float((-(w * s_after).sum(1) / w.sum(1)).mean())
    assert math.isclose(per.h_after, want, rel_tol=1e-12)
    assert per.psis_k is None
    t = torch.randint(1, 9, (8, 5), generator=gen).double()
    f, f_after = 0.7 * t, 0.7 * t + 0.1 * torch.randn(8, 5, generator=gen, dtype=torch.float64)
    tok = snis(*_samples(s, s_after, f, f_after, t), "global", psis=False)
    assert math.isclose(tok.h_after, float((w * f_after).sum() / (w * t).sum()), rel_tol=1e-12)
    assert math.isclose(tok.delta_h, tok.h_after - float(f.sum() / t.sum()), rel_tol=1e-12)
    tok_n = snis(*_samples(s, s_after, f, f_after, t), "per_prompt", psis=False)
    num = ((w * f_after).sum(1) / w.sum(1)).mean()
    den = ((w * t).sum(1) / w.sum(1)).mean()
    assert math.isclose(tok_n.h_after, float(num / den), rel_tol=1e-12)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("realized")
    base, adapter = write_tiny_checkpoint(str(root), TinyConfig(init_std=0.1))
    return str(root), base, adapter


def _spec(ckpt, **kw) -> ProbeSpec:
    _, base, adapter = ckpt
    base_kw = dict(checkpoint=CheckpointSpec(base, adapter),
                   prompts=["1+2=", "3+4=", "5+1=", "2+2="], answers=["3", "7", "6", "4"],
                   responses_per_prompt=4, generation=GenerationSpec(max_new_tokens=6),
                   seed=1)
    base_kw.update(kw)
    return ProbeSpec(**base_kw)


def test_huge_step_gives_low_ess_and_finite_json(ckpt):
    spec = _spec(ckpt, lr_override=5.0, realized=RealizedSpec(lr_multipliers=[1.0, 100.0]))
    result = to_result(run_probe(spec))
    text = json.dumps(result.model_dump(mode="json"), allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text
    assert result.realized.low_ess
    assert result.realized.by_lr_multiplier[1].ess_fraction < 0.5


def test_zero_multiplier_gives_exactly_zero_change_and_a_noise_floor(ckpt):
    out = run_probe(_spec(ckpt, realized=RealizedSpec(lr_multipliers=[0.0, 1.0])))
    (s0, zero), (s1, one) = out.realized.by_multiplier
    assert s0 == 0.0 and zero.delta_h == 0.0 and zero.ess_fraction == 1.0
    assert out.realized.main[0] == 1.0
    assert out.realized.noise_floor is not None and out.realized.noise_floor < 1e-4
    assert out.passes.noise_check_forward > 0


def _digest(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_model_and_optimizer_are_restored_bit_for_bit(ckpt, tmp_path):
    _, base, adapter = ckpt
    with open(f"{adapter}/optimizer.pt", "rb") as f:
        opt_before = hashlib.sha256(f.read()).hexdigest()
    cache = ModelCache()
    spec = _spec(ckpt, realized=RealizedSpec(lr_multipliers=[1.0, 3.0]),
                 save_updated_adapter_to=str(tmp_path / "upd"))
    first = run_probe(spec, cache=cache)
    base_model = cache.model
    base_digest = _digest(base_model.parameters())
    assert not any(p.requires_grad for p in base_model.parameters())
    spec.save_updated_adapter_to = str(tmp_path / "upd2")   # upd holds an adapter now
    second = run_probe(spec, cache=cache)
    assert second.base_reused and cache.loads == 1
    assert _digest(base_model.parameters()) == base_digest
    # identical numbers: the adapter and its step were restored exactly between runs
    assert first.delta_h1.total == second.delta_h1.total
    assert first.realized.main[1].delta_h == second.realized.main[1].delta_h
    with open(f"{adapter}/optimizer.pt", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == opt_before
    # the adapter on disk is untouched and differs from the saved updated one
    _, _, original = load_policy(base, adapter)
    _, _, updated = load_policy(base, str(tmp_path / "upd"))
    assert _digest(original) != _digest(updated)


def test_full_model_probe_restores_base_weights(ckpt):
    """Without an adapter every base weight is trainable (allow_full_model) and is stepped in
    place; the cached base must come back bit for bit."""
    root, base, _ = ckpt
    from probe_core.tiny import build_tokenizer  # noqa: F401  (same tokenizer on disk)
    model, _, _ = load_policy(base, None)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss = sum((p.float() ** 2).sum() for p in params) * 1e-3
    loss.backward()
    opt.step()
    torch.save(opt.state_dict(), f"{root}/full_opt.pt")
    cache = ModelCache()
    spec = _spec(ckpt, checkpoint=CheckpointSpec(base, None, optimizer=f"{root}/full_opt.pt",
                                                 allow_full_model=True))
    run_probe(spec, cache=cache)
    digest = _digest(cache.model.parameters())
    fresh, _, _ = load_policy(base, None)
    assert digest == _digest(fresh.parameters())


def test_updated_adapter_is_the_real_step_whatever_the_multipliers(ckpt, tmp_path):
    _, base, adapter = ckpt
    spec = _spec(ckpt, realized=RealizedSpec(lr_multipliers=[0.5]),
                 save_updated_adapter_to=str(tmp_path / "half"))
    out = run_probe(spec)
    _, _, original = load_policy(base, adapter)
    _, _, updated = load_policy(base, out.updated_adapter)
    theta = torch.cat([p.detach().reshape(-1).double() for p in original])
    stepped = torch.cat([p.detach().reshape(-1).double() for p in updated])
    torch.testing.assert_close(stepped - theta, out.step.delta, rtol=1e-4, atol=1e-7)
    spec.realized.enabled = False
    spec.save_updated_adapter_to = str(tmp_path / "off")
    assert run_probe(spec).updated_adapter == str(tmp_path / "off")


def test_saving_without_an_adapter_fails_before_any_compute(ckpt):
    from probe_core.errors import InvalidRequest
    root, base, adapter = ckpt
    spec = _spec(ckpt, checkpoint=CheckpointSpec(base, None, optimizer=f"{adapter}/optimizer.pt",
                                                 allow_full_model=True),
                 save_updated_adapter_to=f"{root}/nowhere")
    with pytest.raises(InvalidRequest, match="needs checkpoint.adapter") as info:
        run_probe(spec)
    assert info.value.phase == "load"


@pytest.mark.parametrize("where", ["adapter", "inside", "parent", "saved", "file"])
def test_library_refuses_to_overwrite_the_probed_checkpoint(ckpt, tmp_path, where):
    """run_probe (so the CLI too) refuses what the server refuses: the probed adapter's own
    directory, a folder inside or above it, one that holds an adapter, an existing file."""
    from probe_core.errors import InvalidRequest
    root, base, adapter = ckpt
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "adapter_config.json").write_text("{}")
    target = {"adapter": adapter, "inside": f"{adapter}/sub", "parent": root,
              "saved": str(saved), "file": f"{adapter}/optimizer.pt"}[where]
    before = {p: open(f"{adapter}/{p}", "rb").read() for p in ("adapter_model.safetensors",
                                                                "optimizer.pt")}
    with pytest.raises(InvalidRequest, match="save_updated_adapter_to") as info:
        run_probe(_spec(ckpt, save_updated_adapter_to=target))
    assert info.value.phase == "load" and "name a new directory" in info.value.message
    assert before == {p: open(f"{adapter}/{p}", "rb").read() for p in before}
