"""Ground truth for tests: unbatched log-probs and exact enumeration of every response of a
tiny vocabulary, computed with plain full-vocabulary log_softmax (independent of probe_core's
chunked teacher forcing)."""

from __future__ import annotations

import itertools

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from probe_core.tiny import TinyConfig

# The 6-token world: {<eos>, a, b, c, d, e}, every response of ≤ 3 new tokens enumerable
SIX_TOKEN_WORLD = TinyConfig(alphabet="abcde", pad_equals_eos=True, init_std=0.3, seed=5)
# 40 distinct prompts to draw batches from independently: every 1- and 2-letter string, then 10
# of 3 letters (tests that need fewer take a prefix)
PROMPT_POOL = ["".join(c) for k in (1, 2) for c in itertools.product("abcde", repeat=k)] + \
    ["abc", "bad", "cab", "eed", "dea", "ace", "bed", "cde", "eba", "dab"]


def load_policy(base: str, adapter: str | None):
    """A fresh fp32 policy (base + adapter), trainable adapter parameters, and the tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    model.eval()
    tok = AutoTokenizer.from_pretrained(base)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, tok, params


def sequence_logprob(model, prompt: list[int], response: list[int], temperature: float = 1.0
                     ) -> torch.Tensor:
    """S = Σ log softmax(z/τ)[token] over the response, one unpadded sequence at a time."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()   # [L, V]
    lp = torch.log_softmax(logits / temperature, dim=-1)
    return lp.gather(1, torch.tensor(response)[:, None]).sum()


def all_responses(vocab: int, eos: int, max_new: int) -> list[list[int]]:
    """Every response: k non-EOS tokens then EOS (k < max_new), or max_new non-EOS tokens."""
    others = [t for t in range(vocab) if t != eos]
    out = []
    for k in range(max_new):
        out += [list(c) + [eos] for c in itertools.product(others, repeat=k)]
    out += [list(c) for c in itertools.product(others, repeat=max_new)]
    return out


def response_logprobs(model, prompt: list[int], responses: list[list[int]],
                      temperature: float = 1.0) -> torch.Tensor:
    """S for many responses of one prompt, right-padded in one batch. Returns [R] float64."""
    width = max(len(r) for r in responses)
    ids = torch.zeros(len(responses), len(prompt) + width, dtype=torch.long)
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, r in enumerate(responses):
        ids[i, :len(prompt)] = torch.tensor(prompt)
        ids[i, len(prompt):len(prompt) + len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    logits = model(input_ids=ids).logits[:, len(prompt) - 1:-1].double()    # [R, W, V]
    lp = torch.log_softmax(logits / temperature, dim=-1)
    tok_lp = lp.gather(2, ids[:, len(prompt):, None])[..., 0]               # [R, W]
    return (tok_lp * mask).sum(1)


def exact_entropy(model, prompts: list[list[int]], vocab: int, eos: int, max_new: int,
                  temperature: float = 1.0) -> torch.Tensor:
    """H = (1/B) Σ_n −Σ_r π(r|p_n) log π(r|p_n), differentiable in the parameters."""
    responses = all_responses(vocab, eos, max_new)
    hs = []
    for p in prompts:
        s = response_logprobs(model, p, responses, temperature)
        hs.append(-(s.exp() * s).sum())
    return torch.stack(hs).mean()


def set_flat(params, flat: torch.Tensor) -> None:
    """Copy the flat float64 vector `flat` [P] into the parameters, in order."""
    off = 0
    for p in params:
        p.data.copy_(flat[off:off + p.numel()].view(p.shape).to(p.dtype))
        off += p.numel()


def value_at(params, theta: torch.Tensor, restore: torch.Tensor, fn) -> float:
    """float(fn()) without gradients at parameters θ, then the parameters set back to restore."""
    with torch.no_grad():
        set_flat(params, theta)
        try:
            return float(fn())
        finally:
            set_flat(params, restore)


def flat_grad(value: torch.Tensor, params) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                      for g, p in zip(grads, params)])


def sampled_rollouts(model, tok, prompt_texts: list[str], group_size: int, max_new: int,
                     seed: int, reward_fn) -> list:
    """Responses sampled from the policy (pure temperature 1) as client rollouts whose rewards
    are reward_fn(token ids)."""
    from probe_core.rollouts import SamplingPlan, sample
    from probe_core.spec import ClientRollout, GenerationSpec

    batch = sample(model, tok, SamplingPlan(prompt_texts, "raw", group_size,
                                            GenerationSpec(max_new_tokens=max_new,
                                                           batch_size=256), seed),
                   device=torch.device("cpu"))
    width = batch.prompt_width
    out = []
    for n, text in enumerate(prompt_texts):
        rows = range(n * group_size, (n + 1) * group_size)
        resp = [batch.input_ids[i, width:][batch.response_mask[i]].tolist() for i in rows]
        out.append(ClientRollout(text, resp, [reward_fn(r) for r in resp]))
    return out


def response_moments(model, prompt: list[int], responses: list[list[int]],
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """H_n = −Σ_r π(r) log π(r) and E_n[T] = Σ_r π(r)·len(r) over every response, both
    differentiable in the parameters (float64 scalars)."""
    s = response_logprobs(model, prompt, responses, temperature)
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.float64)
    p = s.exp()
    return -(p * s).sum(), (p * lengths).sum()



def pool_moments(model, prompts: list[list[int]], responses: list[list[int]],
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """response_moments of many prompts at once, without gradients: prompts of one length go
    through one right-padded forward of all their (prompt, response) pairs. Returns H_n and
    E_n[T], [K] float64 each, in prompt order."""
    width = max(len(r) for r in responses)
    resp = torch.zeros(len(responses), width, dtype=torch.long)
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, r in enumerate(responses):
        resp[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    lengths = mask.sum(1).double()                                          # [R]
    h, t = torch.zeros(len(prompts), dtype=torch.float64), torch.zeros(len(prompts),
                                                                        dtype=torch.float64)
    with torch.no_grad():
        for size in {len(p) for p in prompts}:
            rows = [k for k, p in enumerate(prompts) if len(p) == size]
            heads = torch.tensor([prompts[k] for k in rows])                # [n, size]
            ids = torch.cat([heads.repeat_interleave(len(responses), 0),
                             resp.repeat(len(rows), 1)], 1)                 # [n·R, size+W]
            logits = model(input_ids=ids).logits[:, size - 1:-1].double()    # [n·R, W, V]
            lp = torch.log_softmax(logits / temperature, dim=-1)
            tok_lp = lp.gather(2, ids[:, size:, None])[..., 0]               # [n·R, W]
            s = (tok_lp * mask.repeat(len(rows), 1)).sum(1).view(len(rows), -1)  # [n, R]
            h[rows], t[rows] = -(s.exp() * s).sum(1), s.exp() @ lengths
    return h, t


def without_momentum_or_decay(adapter: str) -> None:
    """Rewrite <adapter>/optimizer.pt, the real AdamW state of the checkpoint's training steps,
    so that its next step is taken with β1 = 0 and no weight decay: Δθ = lr·D⊙Ȳ is then the
    batch's preconditioned gradient alone. (The momentum and decay terms move θ the same way
    whatever the batch: they carry no same-prompt effect, only noise between prompt draws.)"""
    path = f"{adapter}/optimizer.pt"
    state = torch.load(path, weights_only=True)
    for group in state["param_groups"]:
        group["betas"], group["weight_decay"] = (0.0, group["betas"][1]), 0.0
    torch.save(state, path)


def token_terms(model, prompt: list[int], response: list[int], temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token: log π_τ(y_t | y_<t) and the full next-token entropy h_t at τ, both
    differentiable, one unpadded sequence at a time. Returns ([T], [T]) float64."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    lp = torch.log_softmax(logits, dim=-1)                                  # [T, V]
    return lp.gather(1, torch.tensor(response)[:, None])[:, 0], -(lp.exp() * lp).sum(-1)


def exact_reward(model, prompts: list[list[int]], vocab: int, eos: int, max_new: int,
                 reward_fn, temperature: float = 1.0) -> torch.Tensor:
    """J = (1/B) Σ_n Σ_r π(r|p_n) R(r), differentiable in the parameters; reward_fn(token ids)."""
    responses = all_responses(vocab, eos, max_new)
    r = torch.tensor([reward_fn(x) for x in responses], dtype=torch.float64)
    return torch.stack([(response_logprobs(model, p, responses, temperature).exp() * r).sum()
                        for p in prompts]).mean()


def adamw_delta(params, state_dict: dict, loss: torch.Tensor,
                max_grad_norm: float | None = None) -> torch.Tensor:
    """Δθ of one real torch.optim.AdamW step on `loss` from a saved state_dict (its groups'
    lr, betas, eps, weight decay and moments), with torch's own gradient clipping when
    max_grad_norm is set. The parameters are put back afterwards. Returns [P] float64."""
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW([{"params": [params[i] for i in grp["params"]]}
                             for grp in state_dict["param_groups"]])
    opt.load_state_dict(state_dict)
    opt.zero_grad()
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    delta = torch.cat([(p.detach() - b).reshape(-1).double() for p, b in zip(params, before)])
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    return delta


def enumerated_gradients(model, named_params, prompts: list[list[int]], vocab: int, eos: int,
                         max_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S and ∇S of every response of every prompt, by torch.func (vmap of grad over the
    responses of one prompt, padded after their end; the model is causal, so padding cannot
    reach earlier logits). Returns S [K, R] float64 and ∇S [K, R, P] float32, P in
    named_params order."""
    from torch.func import functional_call, grad, vmap

    responses = all_responses(vocab, eos, max_new)
    values = {n: p.detach() for n, p in named_params}
    s_all, g_all = [], []
    for prompt in prompts:
        width = len(prompt) + max_new
        ids = torch.full((len(responses), width), eos, dtype=torch.long)
        mask = torch.zeros(len(responses), max_new)
        for i, r in enumerate(responses):
            ids[i, :len(prompt)] = torch.tensor(prompt)
            ids[i, len(prompt):len(prompt) + len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1

        def logprob(params, x, m, start=len(prompt)):
            logits = functional_call(model, params, (x[None],)).logits[0, start - 1:-1]
            lp = torch.log_softmax(logits.float(), -1).gather(1, x[start:, None])[:, 0]
            return (lp * m).sum()

        grads = vmap(grad(logprob), in_dims=(None, 0, 0))(values, ids, mask)
        with torch.no_grad():
            s_all.append(vmap(logprob, in_dims=(None, 0, 0))(values, ids, mask).double())
        g_all.append(torch.cat([grads[n].reshape(len(responses), -1) for n, _ in named_params],
                               1))
    return torch.stack(s_all), torch.stack(g_all)
