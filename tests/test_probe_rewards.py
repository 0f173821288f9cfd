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
