"""Rewards, advantages, length normalization and prompt formatting (issue 2)."""

from __future__ import annotations

import pytest
import torch

from probe_core import rewards as rw
from probe_core.rollouts import format_prompts
from probe_core.tiny import TinyConfig, build_tokenizer


@pytest.mark.parametrize("text,value", [
    ("so the answer is #### 1,234", 1234.0), ("\\boxed{3.5} and later 7", 3.5),
    ("first 2 then 41", 41.0), ("#### -12", -12.0), ("$5$ dollars", 5.0), ("none here", None),
    ("x \\boxed{1} y \\boxed{22}", 22.0)])
def test_final_number_extraction(text, value):
    assert rw.extract_final_number(text) == value


def test_scores():
    assert rw.score("exact_match", "  42 \n", "42") == 1.0
    assert rw.score("exact_match", "42.", "42") == 0.0
    assert rw.score("math_answer", "so #### 42.0", "#### 42") == 1.0
    assert rw.score("math_answer", "\\boxed{41}", "42") == 0.0
    assert rw.score("math_answer", "no number", "42") == 0.0


def test_advantages_and_length_norms():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    mean_c = rw.advantages(r, "mean_centered")
    torch.testing.assert_close(mean_c, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4],
                                                    dtype=torch.float64))
    std = rw.advantages(r, "standardized")
    sd = float(torch.tensor([1.0, 0, 0, 1]).std())     # unbiased, as TRL
    torch.testing.assert_close(std[0], mean_c[0] / (sd + 1e-6))
    assert bool((std[1] == 0).all())
    lengths = torch.tensor([[3, 5, 1, 2], [4, 4, 4, 4]])
    assert rw.length_norm(lengths, "constant", 64.0).unique().tolist() == [64.0]
    assert rw.length_norm(lengths, "group_max", 0)[0].tolist() == [5.0] * 4
    assert rw.length_norm(lengths, "per_sequence", 0)[0].tolist() == [3.0, 5.0, 1.0, 2.0]


def test_prompt_formats_match_what_training_sees():
    tok = build_tokenizer(TinyConfig())
    raw = format_prompts(["1+2="], tok, "raw")[0]
    assert tok.decode(raw) == "1+2="
    chat = format_prompts(["1+2="], tok, "chat")[0]
    want = tok.apply_chat_template([{"role": "user", "content": "1+2="}],
                                   add_generation_prompt=True, tokenize=False)
    assert tok.decode(chat) == want and want.endswith("a:")


def test_batch_standardized_is_trls_scale_rewards_batch():
    """TRL's scale_rewards="batch": (R − mean_g R) / (nanstd over every reward + 1e-4), with
    TRL's own nanstd (Bessel-corrected); `standardized` with ε = 1e-4 is scale_rewards="group"."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    gen = torch.Generator().manual_seed(3)
    r = ((torch.rand(5, 4, generator=gen) < 0.3).double()
         + 0.1 * torch.rand(5, 4, generator=gen, dtype=torch.float64))
    centred = r - r.mean(1, keepdim=True)
    flat = r.reshape(-1)
    want_batch = centred / (trl_utils.nanstd(flat) + 1e-4)
    torch.testing.assert_close(rw.advantages(r, "batch_standardized"), want_batch)
    want_group = centred / (trl_utils.nanstd(r, dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(rw.advantages(r, "standardized", eps=1e-4), want_group)
    # the batch std is one scalar: a prompt whose rewards are all equal keeps A = 0, others
    # keep their within-group order and ratios
    r[0] = 1.0
    a = rw.advantages(r, "batch_standardized")
    assert bool((a[0] == 0).all())
    torch.testing.assert_close(a[1:] / (r[1:] - r[1:].mean(1, keepdim=True)),
                               torch.full((4, 4), 1 / (float(r.std()) + 1e-4),
                                          dtype=torch.float64))


def test_token_mean_weights_are_advantage_over_batch_tokens():
    """length_norm token_mean: c^Y = A/(G·ℓ) and the loss −(1/B) Σ c^Y S make every sequence's
    weight A/T_tot (DAPO / TRL loss_type="dapo")."""
    lengths = torch.tensor([[3, 5, 1, 2], [4, 4, 7, 1], [2, 2, 2, 2]])
    b, g = lengths.shape
    ell = rw.length_norm(lengths, "token_mean", 99.0)
    t_tot = float(lengths.sum())
    torch.testing.assert_close(1 / (b * g * ell), torch.full((b, g), 1 / t_tot,
                                                             dtype=torch.float64))
    with pytest.raises(ValueError):
        rw.length_norm(lengths, "token_sum", 1.0)
