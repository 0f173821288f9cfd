"""The TRL callback sends the objective of the trainer's own loss (issue 15): trainer_fields
reads a real GRPOConfig's loss_type, scale_rewards, temperature, max_completion_length and
max_grad_norm; what the request sets itself wins. (tests/test_trl_dapo.py shows the objective
so sent reproduces TRL's step; tests/test_probe_objective.py does so for each loss type.)"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("trl")

from trl import GRPOConfig  # noqa: E402

from schemas import ProbeRequest  # noqa: E402
from service.integrations.trl import _body, applied_entropy_coef, trainer_fields  # noqa: E402

ROLLOUTS = {"rollouts": [{"prompt": "1+2=", "responses": ["3", "4"], "rewards": [1.0, 0.0]},
                         {"prompt": "2+2=", "responses": ["4", "5"], "rewards": [1.0, 0.0]}],
            "reward": {"kind": "provided"}}


def _config(tmp_path, **kw) -> GRPOConfig:
    return GRPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, use_cpu=True,
                      max_completion_length=12, **kw)


@pytest.mark.parametrize("loss_type,scale,objective", [
    ("dapo", "group", {"length_norm": "token_mean", "advantage": "standardized",
                       "advantage_eps": 1e-4}),
    ("bnpo", "batch", {"length_norm": "token_mean", "advantage": "batch_standardized",
                       "advantage_eps": 1e-4}),
    ("grpo", "none", {"length_norm": "per_sequence", "advantage": "mean_centered"}),
    ("dr_grpo", False, {"length_norm": "constant", "length_norm_constant": 12.0,
                        "advantage": "mean_centered"}),
])
def test_objective_follows_loss_type_and_scale_rewards(tmp_path, loss_type, scale, objective):
    args = _config(tmp_path, loss_type=loss_type, scale_rewards=scale, temperature=0.7,
                   max_grad_norm=0.5)
    fields = trainer_fields(args)
    assert "entropy_coef" not in fields["objective"]                  # TRL's default 0
    with_bonus = trainer_fields(_config(tmp_path, loss_type=loss_type, entropy_coef=0.05))
    assert with_bonus["objective"]["entropy_coef"] == 0.05
    # under adaptive control the trainer's current coefficient wins over args' initial one
    assert trainer_fields(args, entropy_coef=0.02)["objective"]["entropy_coef"] == 0.02
    assert fields == {"objective": objective,
                      "generation": {"temperature": 0.7, "max_new_tokens": 12},
                      "optimizer_overrides": {"max_grad_norm": 0.5}}
    body = ProbeRequest.model_validate(_body(ROLLOUTS, "ckpt", None, fields))
    sent = body.objective.model_dump()
    assert {k: sent[k] for k in objective} == objective
    assert body.generation.temperature == 0.7 and body.optimizer_overrides.max_grad_norm == 0.5


def test_request_wins_and_unreproduced_losses_are_left_to_the_request(tmp_path, caplog):
    args = _config(tmp_path, loss_type="dapo", max_grad_norm=0.0)       # 0: no clipping
    fields = trainer_fields(args)
    assert "optimizer_overrides" not in fields
    mine = {**ROLLOUTS, "objective": {"length_norm": "per_sequence"},
            "generation": {"temperature": 0.9}}
    body = ProbeRequest.model_validate(_body(mine, "ckpt", None, fields))
    assert body.objective.length_norm == "per_sequence"             # the request's own
    assert body.objective.advantage == "standardized"               # the trainer's
    assert body.generation.temperature == 0.9 and body.generation.max_new_tokens == 12
    template = ProbeRequest.model_validate({**ROLLOUTS, "checkpoint": {"adapter": "x"}})
    body = ProbeRequest.model_validate(_body(template, "ckpt", None, fields))
    assert body.objective.length_norm == "token_mean"      # defaults do not count as set
    with caplog.at_level(logging.WARNING, logger="service.integrations.trl"):
        fields = trainer_fields(_config(tmp_path, loss_type="cispo"))
    assert "length_norm" not in fields["objective"]
    assert any("cispo" in r.getMessage() for r in caplog.records)


def test_adaptive_entropy_coefficient_is_the_one_the_next_step_applies(tmp_path):
    """use_adaptive_entropy: TRL applies the current coefficient only while the last window's
    entropy is at or below entropy_target, else 0; a static coefficient applies as it is."""
    class Trainer:
        entropy_coef, _last_world_entropy = 0.03, 1.2

    args = _config(tmp_path, use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=1.0)
    assert applied_entropy_coef(Trainer(), args) == 0.0            # above target: gated off
    Trainer._last_world_entropy = 0.8
    assert applied_entropy_coef(Trainer(), args) == 0.03           # below: the current one
    static = _config(tmp_path, entropy_coef=0.01)
    assert applied_entropy_coef(Trainer(), static) == 0.03
    assert applied_entropy_coef(None, static) is None               # not attached: args'
    assert trainer_fields(static, None)["objective"]["entropy_coef"] == 0.01
