"""Teacher forcing and sampling held to ground truth (issue 2)."""

from __future__ import annotations

import math

import pytest
import torch

from exact_world import all_responses, load_policy, response_logprobs, sequence_logprob
from probe_core.rollouts import SamplingPlan, assemble, eos_ids, sample
from probe_core.spec import GenerationSpec
from probe_core.teacher_forcing import TeacherForcer, all_logprobs
from probe_core.tiny import TinyConfig, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base, adapter = write_tiny_checkpoint(str(tmp_path_factory.mktemp("tf")), TinyConfig())
    model, tok, _ = load_policy(base, adapter)
    return model, tok


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """A 6-token world: <eos> (= pad) and a–e."""
    cfg = TinyConfig(alphabet="abcde", pad_equals_eos=True, seed=3, init_std=0.3)
    base, adapter = write_tiny_checkpoint(str(tmp_path_factory.mktemp("six")), cfg)
    model, tok, _ = load_policy(base, adapter)
    assert len(tok) == 6 and tok.pad_token_id == tok.eos_token_id
    return model, tok


def _forced(model, tok, prompts, responses, g, microbatch, temperature=1.0):
    batch = assemble(prompts, responses, g, eos_ids(model, tok), tok.pad_token_id, tok)
    forcer = TeacherForcer(model, batch, temperature, torch.device("cpu"), None)
    chunks = list(torch.arange(batch.num_sequences).split(microbatch))
    return batch, all_logprobs(forcer, chunks)


def test_logprobs_equal_unbatched_sums_across_prompt_lengths(tiny):
    model, tok = tiny
    eos = tok.eos_token_id
    prompts = [tok.encode("1+2="), tok.encode("13+22=?"), tok.encode("7")]
    responses = [tok.encode("3") + [eos], tok.encode("35 and more"), tok.encode("9") + [eos],
                 tok.encode("x"), tok.encode("hello") + [eos], tok.encode("ab")]
    for temperature in (1.0, 0.7):
        batch, s = _forced(model, tok, prompts, responses, 2, microbatch=4,
                           temperature=temperature)
        with torch.no_grad():
            truth = torch.stack([sequence_logprob(model, prompts[i // 2], r, temperature)
                                 for i, r in enumerate(responses)])
        torch.testing.assert_close(s.double(), truth, rtol=1e-5, atol=1e-5)
        # one prompt at a time (no left padding at all) gives the same S
        for n, p in enumerate(prompts):
            _, alone = _forced(model, tok, [p], responses[2 * n:2 * n + 2], 2, microbatch=1,
                               temperature=temperature)
            torch.testing.assert_close(alone, s[2 * n:2 * n + 2], rtol=1e-5, atol=1e-5)


def test_pad_id_inside_a_response_is_an_ordinary_token(tiny):
    model, tok = tiny
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert pad != eos
    prompt = tok.encode("2+2=")
    responses = [tok.encode("4") + [pad, pad] + tok.encode("4") + [eos], tok.encode("4") + [eos]]
    batch, s = _forced(model, tok, [prompt], responses, 2, microbatch=2)
    assert batch.lengths.tolist() == [5, 2]
    with torch.no_grad():
        truth = sequence_logprob(model, prompt, responses[0])
    assert abs(float(s[0]) - float(truth)) < 1e-5


def test_pad_equal_to_eos_ends_response_at_first_eos_by_position(six):
    model, tok = six
    eos = tok.eos_token_id
    a, b = tok.convert_tokens_to_ids(["a", "b"])
    prompt = [a, b]
    # tokens after the first EOS (another EOS, then 'a') are excluded by position
    responses = [[a, eos, eos, a], [b, b, a, b]]
    batch, s = _forced(model, tok, [prompt], responses, 2, microbatch=2)
    assert batch.lengths.tolist() == [2, 4]
    with torch.no_grad():
        truth = [sequence_logprob(model, prompt, [a, eos]), sequence_logprob(model, prompt,
                                                                              responses[1])]
    torch.testing.assert_close(s.double(), torch.stack(truth), rtol=1e-5, atol=1e-5)


def _chi2_critical(df: int, z: float = 3.72) -> float:
    """Wilson–Hilferty upper quantile of χ²_df (z = 3.72: p ≈ 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,hostile", [(1.0, False), (1.5, False), (1.0, True)])
def test_sampling_frequencies_match_exact_enumeration(six, temperature, hostile):
    """hostile: the checkpoint's generation_config asks for top_k, a repetition penalty and
    another temperature (as Qwen's does); sampling must ignore it and follow π_τ."""
    model, tok = six
    eos = tok.eos_token_id
    prompt_text, max_new, n = "ab", 2, 3000
    gen = GenerationSpec(max_new_tokens=max_new, temperature=temperature, batch_size=1000)
    lm_config = model.get_base_model().generation_config
    saved = lm_config.to_dict()
    if hostile:
        lm_config.update(top_k=2, repetition_penalty=3.0, temperature=0.3, top_p=0.5,
                         no_repeat_ngram_size=1)
    try:
        batch = sample(model, tok, SamplingPlan([prompt_text], "raw", n, gen, seed=11),
                       device=torch.device("cpu"))
    finally:
        model.get_base_model().generation_config = type(lm_config).from_dict(saved)
    responses = all_responses(len(tok), eos, max_new)
    with torch.no_grad():
        probs = response_logprobs(model, tok.encode(prompt_text), responses, temperature).exp()
    assert abs(float(probs.sum()) - 1) < 1e-9
    index = {tuple(r): i for i, r in enumerate(responses)}
    counts = torch.zeros(len(responses))
    width = batch.prompt_width
    for i in range(n):
        resp = batch.input_ids[i, width:][batch.response_mask[i]].tolist()
        counts[index[tuple(resp)]] += 1
    critical = _chi2_critical(len(responses) - 1)

    def chi2(p: torch.Tensor) -> float:
        return float(((counts - p * n) ** 2 / (p * n)).sum())

    assert chi2(probs) < critical, chi2(probs)
    # the test has power: the distribution at another temperature is rejected
    with torch.no_grad():
        other = response_logprobs(model, tok.encode(prompt_text), responses,
                                  temperature + 0.5).exp()
    assert chi2(other) > critical
