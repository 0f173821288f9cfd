"""Degenerate inputs give a clear error or a documented value, never NaN (issue 3), and the
jackknife SE is calibrated against the spread of estimates over seeds."""

from __future__ import annotations

import json
import statistics

import pytest

from exact_world import load_policy, sampled_rollouts
from probe_core.checkpoint import ModelCache
from probe_core.errors import DegenerateBatch
from probe_core.probe import run_probe
from probe_core.spec import (CheckpointSpec, ClientRollout, EntropySpec, EstimatorSpec,
                             GenerationSpec, ProbeSpec, RealizedSpec)
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

FIRST_ROUND = EntropySpec(normalization="sequence", estimator="sampled")
from service.mapping import to_result


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("degenerate")
    return write_tiny_checkpoint(str(root), TinyConfig(alphabet="abcde", pad_equals_eos=True,
                                                       init_std=0.3, seed=5))


def _rollouts(rewards: list[list[float]]) -> list[ClientRollout]:
    resp = [[1, 0], [2, 2, 0], [3, 1, 4], [5]]
    return [ClientRollout("ab", resp[:len(r)], r) for r in rewards]


def _run(ckpt, rewards, **kw):
    base, adapter = ckpt
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), entropy=FIRST_ROUND,
                     rollouts=_rollouts(rewards),
                     reward_kind="provided", responses_per_prompt=len(rewards[0]),
                     generation=GenerationSpec(max_new_tokens=4), **kw)
    out = run_probe(spec)
    text = json.dumps(to_result(out).model_dump(mode="json"), allow_nan=False)
    return out, json.loads(text)


def test_two_units_have_no_jackknife_se(ckpt):
    out, result = _run(ckpt, [[1, 0, 0], [0, 1, 1]])
    assert result["delta_h1"]["se"] is None
    assert result["delta_h1"]["u_statistic"]["se_jackknife"] is None
    assert result["delta_h1"]["u_statistic"]["se_plugin"] is not None
    assert any("jackknife" in w for w in result["warnings"])


def test_one_unit_is_a_clear_error(ckpt):
    with pytest.raises(DegenerateBatch, match="at least 2"):
        _run(ckpt, [[1, 0, 0]])
    with pytest.raises(DegenerateBatch, match="at least 2"):
        _run(ckpt, [[1, 0], [0, 1], [1, 1], [0, 0]],
             estimator=EstimatorSpec(mode="blocks", block_size=4))


def test_all_advantages_zero_gives_zero_gradient_term(ckpt):
    out, result = _run(ckpt, [[1, 1, 1], [0, 0, 0], [1, 1, 1]])
    assert result["delta_h1"]["gradient_term"] == 0.0
    assert result["batch"]["zero_advantage_prompts"] == 3
    assert result["optimizer"]["grad_norm"] == 0.0
    assert any("advantage is zero" in w for w in result["warnings"])
    assert result["delta_h1"]["total"] == pytest.approx(
        result["delta_h1"]["momentum_term"] + result["delta_h1"]["weight_decay_term"])


def test_lr_zero_makes_every_change_zero_and_override_restores_it(ckpt):
    _, result = _run(ckpt, [[1, 0, 0], [0, 1, 1], [1, 0, 1]], lr_override=0.0)
    assert result["delta_h1"]["total"] == 0.0
    assert result["realized"]["delta_h"] == 0.0
    assert any("lr is 0" in w for w in result["warnings"])
    _, again = _run(ckpt, [[1, 0, 0], [0, 1, 1], [1, 0, 1]], lr_override=1e-3)
    assert again["delta_h1"]["total"] != 0.0 and again["optimizer"]["lr"] == 1e-3


def test_group_of_one_is_refused(ckpt):
    with pytest.raises(DegenerateBatch, match="at least 2"):
        _run(ckpt, [[1], [0], [1]])


def test_jackknife_se_is_calibrated_over_seeds(ckpt):
    """Over independent batches the mean jackknife SE matches the spread of δH₁ (ratio printed
    for the closing note)."""
    base, adapter = ckpt
    model, tok, _ = load_policy(base, adapter)
    a_id = tok.convert_tokens_to_ids("a")
    cache = ModelCache()
    totals, ses = [], []
    for seed in range(40):
        rollouts = sampled_rollouts(model, tok, ["ab", "cd", "e", "bad"] * 4, 4, 3, seed,
                                    lambda r: float(a_id in r))
        spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), entropy=FIRST_ROUND,
                         rollouts=rollouts,
                         reward_kind="provided", responses_per_prompt=4,
                         generation=GenerationSpec(max_new_tokens=3), microbatch_size=4,
                         realized=RealizedSpec(enabled=False))
        out = run_probe(spec, cache=cache)
        totals.append(out.delta_h1.total)
        ses.append(out.delta_h1.se)
    ratio = statistics.mean(ses) / statistics.stdev(totals)
    print(f"\njackknife calibration over 40 seeds: mean SE / sd(estimates) = {ratio:.3f}")
    assert 0.7 < ratio < 1.4
