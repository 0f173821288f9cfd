"""B prompts × G responses as host tensors: sampled with generate() or taken from the client.

Layout: sequence i = n·G + g. Prompts are left-padded to a common width P and responses
right-padded to a common length L, so sequence i is input_ids[i] = [pad…, prompt, response, pad…].
Responses end at their first EOS *by position* (the EOS included); nothing ever compares token
ids with the pad id, which may equal EOS or be sampled as an ordinary token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from probe_core.checkpoint import causal_lm
from probe_core.collective import SOLO, Collective, shard_units
from probe_core.errors import InvalidRequest, TokenizerError
from probe_core import rewards as rw
from probe_core.spec import ClientRollout, GenerationSpec, ProbeSpec


CALL_SEED_STRIDE = 1 << 20     # generate() calls per batch with distinct seeds
# generate() draws from torch's global generator: shards in threads of one process
# (collective.ThreadGroup) take turns, so each call sees only its own seed's stream
_GLOBAL_RNG = threading.Lock()


@dataclass
class Batch:
    input_ids: torch.Tensor        # [N, P+L] long, host
    attention_mask: torch.Tensor   # [N, P+L] long: 0 on left padding, 1 on prompt and response
    prompt_lengths: torch.Tensor   # [N] long
    response_mask: torch.Tensor    # [N, L] bool: response tokens up to and including first EOS
    prompt_width: int              # P
    num_prompts: int               # B
    group_size: int                # G
    response_texts: list[str]      # [N] decoded responses (for rewards)

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """[N] response lengths in tokens."""
        return self.response_mask.sum(dim=1)


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(cfg_eos, int):
        ids.add(cfg_eos)
    elif cfg_eos:
        ids.update(cfg_eos)
    return sorted(i for i in ids if i is not None)


def response_mask(tokens: torch.Tensor, eos: list[int], lengths: torch.Tensor) -> torch.Tensor:
    """Mask of response positions up to and including the first EOS (by position).

    Args: tokens [N, L]; lengths [N], the number of valid positions in each row (positions past
    it are padding by construction). Returns [N, L] bool.
    """
    n, width = tokens.shape
    pos = torch.arange(width).expand(n, width)                           # [N, L]
    valid = pos < lengths[:, None]
    is_eos = torch.isin(tokens, torch.tensor(eos)) & valid
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), lengths)  # [N]
    end = torch.minimum(first + 1, lengths)
    return pos < end[:, None]


def format_prompts(prompts: list[str], tokenizer, prompt_format: str) -> list[list[int]]:
    """Token ids of each prompt, as TRL builds them (chat template or raw, no extra specials)."""
    out = []
    for p in prompts:
        if prompt_format == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise TokenizerError("prompt_format='chat' but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                 add_generation_prompt=True, tokenize=False)
        else:
            text = p
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidRequest(f"prompt {p[:40]!r} tokenizes to nothing")
        out.append(list(ids))
    return out


def check_context(model, prompt_ids: list[list[int]], response_tokens: int) -> None:
    """Refuse sequences longer than the model's context before spending compute on them."""
    lm = causal_lm(model)
    limit = getattr(lm.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompt_ids) + response_tokens
    if limit and longest > limit:
        raise InvalidRequest(f"the longest prompt plus {response_tokens} response tokens is "
                             f"{longest} tokens, beyond the model's context of {limit}; shorten "
                             "the prompts or lower generation.max_new_tokens")


def assemble(prompt_ids: list[list[int]], responses: list[list[int]], group_size: int,
             eos: list[int], pad_id: int, tokenizer) -> Batch:
    """Lay out B prompts (each repeated G times) and N = B·G responses as a Batch."""
    n_seq = len(responses)
    width = max(len(p) for p in prompt_ids)
    resp_len = max(1, max(len(r) for r in responses))
    ids = torch.full((n_seq, width + resp_len), pad_id, dtype=torch.long)
    attn = torch.zeros((n_seq, width + resp_len), dtype=torch.long)
    raw_tokens = torch.full((n_seq, resp_len), pad_id, dtype=torch.long)
    raw_len = torch.zeros(n_seq, dtype=torch.long)
    plen = torch.zeros(n_seq, dtype=torch.long)
    for i, resp in enumerate(responses):
        p = prompt_ids[i // group_size]
        ids[i, width - len(p):width] = torch.tensor(p)
        attn[i, width - len(p):] = 1
        plen[i] = len(p)
        if resp:
            raw_tokens[i, :len(resp)] = torch.tensor(resp)
        raw_len[i] = len(resp)
    rmask = response_mask(raw_tokens, eos, raw_len)
    ids[:, width:] = torch.where(rmask, raw_tokens, torch.full_like(raw_tokens, pad_id))
    texts = [tokenizer.decode(raw_tokens[i][rmask[i]].tolist(), skip_special_tokens=True)
             for i in range(n_seq)]
    return Batch(ids, attn, plen, rmask, width, len(prompt_ids), group_size, texts)


def from_client(rollouts: list[ClientRollout], tokenizer, model, prompt_format: str
                ) -> tuple[Batch, torch.Tensor]:
    """The training loop's own batch. Text responses are tokenized as they are (no EOS added:
    send token ids to include it exactly). Returns the batch and rewards [B, G]."""
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt_ids = format_prompts([r.prompt for r in rollouts], tokenizer, prompt_format)
    responses = []
    for r in rollouts:
        for resp in r.responses:
            ids = list(resp) if isinstance(resp, list) else \
                tokenizer(resp, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InvalidRequest("a response is empty after tokenization; every response "
                                     "needs at least one token")
            if max(ids) >= vocab:
                raise InvalidRequest(f"response token id {max(ids)} is outside the model's "
                                     f"vocabulary of {vocab}")
            responses.append(ids)
    check_context(model, prompt_ids, max(len(r) for r in responses))
    g = len(rollouts[0].responses)
    batch = assemble(prompt_ids, responses, g, eos_ids(model, tokenizer),
                     tokenizer.pad_token_id, tokenizer)
    rewards = torch.tensor([r.rewards for r in rollouts], dtype=torch.float64)
    return batch, rewards


@dataclass
class SamplingPlan:
    """What to sample: G responses to each prompt at the generation settings, seeded."""

    prompts: list[str]
    prompt_format: str
    group_size: int
    generation: GenerationSpec
    seed: int


def call_seed(seed: int, call: int) -> int:
    """The RNG seed of generate() call `call` of a batch sampled with `seed`: each call is
    seeded on its own, so a call's responses depend only on the seed, its index and its
    prompts, not on which worker makes it (a job over several workers samples the same
    responses as on one)."""
    return (seed * CALL_SEED_STRIDE + call) % 2**63


@torch.no_grad()
def sample(model, tokenizer, plan: SamplingPlan, device: torch.device, on_chunk=None,
           comm: Collective = SOLO) -> Batch:
    """Sample G responses per prompt from π_τ with generate(), batched across prompts with left
    padding, at most generation.batch_size sequences per call, each call seeded by call_seed.
    With several shards (`comm`), each makes a contiguous block of the calls and they gather
    the responses, so every shard returns the whole batch. on_chunk(done, total) reports
    progress."""
    from transformers import GenerationConfig

    gen = plan.generation
    prompt_ids = format_prompts(plan.prompts, tokenizer, plan.prompt_format)
    check_context(model, prompt_ids, gen.max_new_tokens)
    config = GenerationConfig(
        do_sample=True, temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k,
        max_new_tokens=gen.max_new_tokens, eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0, num_beams=1,
        min_new_tokens=0)
    # generate() fills every setting the config leaves unset from the checkpoint's own
    # generation_config (Qwen ships top_k=20, top_p=0.8, repetition_penalty=1.05 ...): those
    # would change the sampling distribution away from π_τ, so they are hidden while sampling.
    lm = causal_lm(model)
    saved, lm.generation_config = lm.generation_config, GenerationConfig()
    try:
        responses = _generate(model, prompt_ids, plan, config, device, on_chunk, comm)
    finally:
        lm.generation_config = saved
    return assemble(prompt_ids, responses, plan.group_size, config.eos_token_id,
                    config.pad_token_id, tokenizer)


def _generate(model, prompt_ids: list[list[int]], plan: SamplingPlan, config,
              device: torch.device, on_chunk, comm: Collective) -> list[list[int]]:
    """The responses' token ids (up to and including the first EOS), G per prompt in order."""
    g, pad = plan.group_size, config.pad_token_id
    per_call = max(1, plan.generation.batch_size // g)
    starts = range(0, len(prompt_ids), per_call)
    responses: list[list[int]] = []
    for call in shard_units(len(starts), comm.rank, comm.size):
        start = starts[call]
        chunk = [p for p in prompt_ids[start:start + per_call] for _ in range(g)]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], attn[i, width - len(p):] = torch.tensor(p), 1
        with _GLOBAL_RNG:
            torch.manual_seed(call_seed(plan.seed, call))
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                 generation_config=config)
        new = out[:, width:].cpu()                                        # [n, L_call]
        lengths = torch.full((new.shape[0],), new.shape[1], dtype=torch.long)
        mask = response_mask(new, config.eos_token_id, lengths)
        responses += [new[i][mask[i]].tolist() for i in range(new.shape[0])]
        if on_chunk:
            on_chunk(min(start + per_call, len(prompt_ids)), len(prompt_ids))
    return [r for part in comm.exchange("gather", responses) for r in part]


def batch_for(spec: ProbeSpec, ck, device: torch.device, on_chunk=None,
              comm: Collective = SOLO) -> tuple[Batch, torch.Tensor, list[str]]:
    """The probe's batch: the client's rollouts, or G responses sampled per prompt and scored.
    Returns the batch, rewards [B, G] float64 and warnings for the result."""
    if spec.rollouts is not None:
        rollouts = spec.rollouts[:spec.num_prompts] if spec.num_prompts else spec.rollouts
        batch, rewards = from_client(rollouts, ck.tokenizer, ck.model, spec.prompt_format)
        return batch, rewards, []
    prompts = spec.prompts[:spec.num_prompts] if spec.num_prompts else spec.prompts
    answers = spec.answers[:len(prompts)]
    g = spec.responses_per_prompt
    plan = SamplingPlan(prompts, spec.prompt_format, g, spec.generation, spec.seed)
    batch = sample(ck.model, ck.tokenizer, plan, device, on_chunk=on_chunk, comm=comm)
    rewards = torch.tensor([[rw.score(spec.reward_kind, batch.response_texts[n * g + j],
                                      answers[n]) for j in range(g)]
                            for n in range(len(prompts))], dtype=torch.float64)
    warnings = []
    if spec.generation.top_p < 1.0 or spec.generation.top_k > 0:
        warnings.append("top_p/top_k truncate the sampling distribution, while S and H use the "
                        "full softmax: δH₁ and the realized ΔH are exact only for pure "
                        "temperature sampling")
    return batch, rewards, warnings
