"""The one-backward-per-objective `hooks` gradient path equals one autograd.grad per weighted
row (`two_backward`).

Every unit summary (X^seq_u, N_u, Y_u; sampled and full-vocabulary) on tiny real checkpoints, with responses of
different lengths, EOS in the middle of a response (tokens after it are not part of S), the pad
id sampled as an ordinary token, a tokenizer whose pad equals EOS, chunks that split a unit, and
blocks mode; then the whole probe with either method.
"""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from probe_core.checkpoint import ModelCache, open_checkpoint
from probe_core.estimators.base import contiguous_layout
from probe_core.gradients import FlatParams, GradientAccumulator
from probe_core.probe import run_probe
from probe_core.rollouts import from_client
from probe_core.spec import (CheckpointSpec, ClientRollout, EntropySpec, EstimatorSpec,
                             GenerationSpec, ProbeSpec, RealizedSpec, RuntimeOptions)
from probe_core.summaries import UPDATE, SummaryPlan
from probe_core.teacher_forcing import TeacherForcer
from probe_core.tiny import TinyConfig, write_tiny_checkpoint

G, MAX_NEW = 4, 10


@pytest.fixture(scope="module", params=[False, True], ids=["pad!=eos", "pad==eos"])
def ckpt(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    base, adapter = write_tiny_checkpoint(
        str(out), TinyConfig(pad_equals_eos=request.param, vocab_size=64, train_steps=2))
    return base, adapter


def _rollouts(tokenizer, num_prompts: int, seed: int = 0) -> list[ClientRollout]:
    """Responses of lengths 1..MAX_NEW, some with EOS mid-sequence followed by more tokens,
    some containing the pad id as an ordinary token, some without EOS."""
    rng = random.Random(seed)
    eos, pad, vocab = tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)
    out = []
    for n in range(num_prompts):
        responses = []
        for g in range(G):
            length = rng.randint(1, MAX_NEW)
            ids = [rng.randrange(2, vocab) for _ in range(length)]
            kind = (n + g) % 4
            if kind == 0 and length >= 3:
                ids[length // 2] = eos                 # EOS mid-sequence: the rest is dropped
            elif kind == 1:
                ids[0] = pad                           # the pad id as an ordinary token
                ids[-1] = eos
            elif kind == 2:
                ids[-1] = eos
            responses.append(ids)
        out.append(ClientRollout("ab+" * (1 + n % 3), responses,
                                 [float(rng.random() < 0.5) for _ in range(G)]))
    return out


@contextlib.contextmanager
def _loaded(ckpt, num_prompts: int, temperature: float):
    """The checkpoint opened on the CPU with a client batch: (ck, batch, forcer, flat)."""
    base, adapter = ckpt
    with open_checkpoint(CheckpointSpec(base, adapter), RuntimeOptions(device="cpu"),
                         torch.device("cpu"), ModelCache()) as ck:
        batch, _ = from_client(_rollouts(ck.tokenizer, num_prompts), ck.tokenizer, ck.model,
                               "raw")
        forcer = TeacherForcer(ck.model, batch, temperature, torch.device("cpu"), None)
        yield ck, batch, forcer, FlatParams.of([p for _, p in ck.params])


def _unit_vectors(ckpt, method: str, per_unit: int, microbatch: int, kind: EntropySpec):
    """Every unit summary (stacked [U, P] per name), the backwards run, the sequence count."""
    with _loaded(ckpt, 4, 0.8) as (ck, batch, forcer, flat):
        assert batch.lengths.min() < batch.lengths.max()
        acc = GradientAccumulator(forcer, ck.model, flat, method)
        assert acc.method == method
        gen = torch.Generator().manual_seed(1)
        c_y = torch.randn(batch.num_sequences, generator=gen, dtype=torch.float64)
        plan = SummaryPlan(kind, {UPDATE: c_y}, G)
        layout = contiguous_layout(batch.num_prompts, G, per_unit)
        out, backs = {}, 0
        for u, chunks in enumerate(layout.chunks(microbatch)):
            grad = acc.unit(chunks, plan, layout.prompt_weight[layout.prompts[u]])
            for name, v in grad.summary.vectors().items():
                out.setdefault(name, []).append(v.clone())
            backs += grad.backward
        return {k: torch.stack(v) for k, v in out.items()}, backs, batch.num_sequences


KINDS = [EntropySpec("sequence", "sampled"), EntropySpec("token_mean", "full_vocabulary")]


@pytest.mark.parametrize("kind", KINDS, ids=["sequence-sampled", "token_mean-full"])
@pytest.mark.parametrize("per_unit,microbatch", [(1, 3), (1, 4), (2, 3)],
                         ids=["exact-split", "exact-whole", "blocks-split"])
def test_hooks_equal_two_backward(ckpt, per_unit, microbatch, kind):
    hooks, back_h, n = _unit_vectors(ckpt, "hooks", per_unit, microbatch, kind)
    ref, back_t, _ = _unit_vectors(ckpt, "two_backward", per_unit, microbatch, kind)
    assert set(hooks) == set(ref) and len(ref) == (2 if kind.normalization == "sequence" else 3)
    for name, want in ref.items():
        assert want.shape[0] == 4 // per_unit and want.abs().max() > 0, name
        torch.testing.assert_close(hooks[name], want, rtol=1e-5,
                                   atol=1e-6 * float(want.abs().max()))
    backwards_per_sequence = 1 if kind.estimator == "sampled" else 2
    assert back_h == backwards_per_sequence * n and back_t > back_h


def test_hooks_apply_only_where_every_parameter_is_a_lora_linear(ckpt):
    with _loaded(ckpt, 2, 1.0) as (ck, batch, forcer, flat):
        assert GradientAccumulator(forcer, ck.model, flat).method == "hooks"
        norm = [p for n, p in ck.model.named_parameters() if "norm" in n][0]
        norm.requires_grad_(True)
        try:
            with_norm = FlatParams.of([p for _, p in ck.params] + [norm])
            assert GradientAccumulator(forcer, ck.model, with_norm).method == "two_backward"
        finally:
            norm.requires_grad_(False)


@pytest.mark.parametrize("mode", ["exact", "blocks"])
def test_probe_numbers_do_not_depend_on_the_gradient_method(ckpt, mode):
    base, adapter = ckpt
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    spec = ProbeSpec(checkpoint=CheckpointSpec(base, adapter), rollouts=_rollouts(tok, 6),
                     responses_per_prompt=G, reward_kind="provided",
                     generation=GenerationSpec(max_new_tokens=MAX_NEW),
                     estimator=EstimatorSpec(mode=mode, block_size=2),
                     realized=RealizedSpec(lr_multipliers=[1.0]), microbatch_size=3)
    cache = ModelCache()
    out = {m: run_probe(spec, RuntimeOptions(device="cpu", grad_method=m), cache)
           for m in ("hooks", "two_backward")}
    h, t = out["hooks"], out["two_backward"]
    assert h.grad_method == "hooks" and t.grad_method == "two_backward"
    for field in ("total", "gradient_term", "momentum_term", "weight_decay_term"):
        a, b = getattr(h.delta_h1, field), getattr(t.delta_h1, field)
        assert a == pytest.approx(b, rel=1e-4, abs=1e-9), field
    assert h.delta_h1.u_statistic.value == pytest.approx(t.delta_h1.u_statistic.value, rel=1e-4,
                                                     abs=1e-12)
    assert h.realized.main[1].delta_h == pytest.approx(t.realized.main[1].delta_h, rel=1e-3,
                                                       abs=1e-7)
    assert h.passes.backward < t.passes.backward


def test_hooks_backward_stops_at_the_lora_a_outputs(ckpt):
    """The backward is asked for the LoRA A outputs only: autograd computes no weight gradient
    of its own (the hooks compute them, weighted) and nothing below the first LoRA layer."""
    with _loaded(ckpt, 2, 1.0) as (ck, batch, forcer, flat):
        acc = GradientAccumulator(forcer, ck.model, flat, "hooks")
        with acc.capture:
            forcer.logprobs(torch.arange(3), grad=True)
        inputs = acc.capture.backward_inputs()
        n_lora_a = sum(1 for n, m in ck.model.named_modules()
                       if isinstance(m, torch.nn.Linear) and ".lora_A." in n + ".")
        assert len(inputs) == n_lora_a > 0
        assert not any(isinstance(t, torch.nn.Parameter) for t in inputs)
        assert all(t.shape[-1] == 4 for t in inputs)           # [n, T, r], r = lora_rank


def test_hooks_on_plain_linear_weights_equal_two_backward(ckpt):
    """Trainable weights of ordinary bias-free Linear layers (no LoRA chain): the backward
    reaches their weights, and X_u, Y_u still equal the two-backward reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = ckpt
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("q_proj.weight", "down_proj.weight")))
    params = [p for p in model.parameters() if p.requires_grad]
    batch, _ = from_client(_rollouts(tok, 2), tok, model, "raw")
    forcer = TeacherForcer(model, batch, 1.0, torch.device("cpu"), None)
    flat = FlatParams.of(params)
    c_y = torch.linspace(2, -1, batch.num_sequences, dtype=torch.float64)
    plan = SummaryPlan(EntropySpec("token_mean", "full_vocabulary"), {UPDATE: c_y}, G)
    chunks = contiguous_layout(batch.num_prompts, G, 1).chunks(3)[0]
    hooks = GradientAccumulator(forcer, model, flat, "hooks")
    with hooks.capture:
        forcer.logprobs(chunks[0], grad=True)
    assert all(isinstance(t, torch.nn.Parameter) for t in hooks.capture.backward_inputs())
    weight = torch.ones(1, dtype=torch.float64)
    h = hooks.unit(chunks, plan, weight).summary.vectors()
    t = GradientAccumulator(forcer, model, flat, "two_backward").unit(chunks, plan,
                                                                       weight).summary.vectors()
    for name, want in t.items():
        torch.testing.assert_close(h[name], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
