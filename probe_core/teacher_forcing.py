"""Per-token log-probabilities log π_τ(y_t | y_<t) and full-vocabulary entropies
h_t = logsumexp(z/τ) − Σ_a π_a z_a/τ, chunked so that logits never exist as a full fp32
[tokens, vocab] tensor: the LM head, cross-entropy and entropy run over token chunks, and with
grad each chunk is recomputed in backward (activation checkpointing). Sequence sums: S = Σ_t
log π, f = Σ_t h_t."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from probe_core.checkpoint import causal_lm
from probe_core.rollouts import Batch

LOGIT_CHUNK_ELEMENTS = 1 << 24   # ≤ 64 MiB of fp32 logits per token chunk


@dataclass
class LogitScale:
    """How logits become the sampling distribution: z → softcap·tanh(z/softcap) (Gemma-2
    style, when set), then / τ."""

    temperature: float
    softcap: float | None


def _scaled_logits(head: torch.nn.Module, hidden: torch.Tensor, scale: LogitScale
                   ) -> torch.Tensor:
    """u = softcap(head(hidden))/τ for [k, d] hidden states, [k, V] fp32."""
    logits = head(hidden).float()                                     # [k, V]
    if scale.softcap:
        logits = scale.softcap * torch.tanh(logits / scale.softcap)
    if scale.temperature != 1.0:        # x/1 == x exactly: skip a [k, V] pass at τ = 1
        logits = logits / scale.temperature
    return logits


def _token_values(u: torch.Tensor, targets: torch.Tensor, entropy: bool):
    """log π[target] [k], h [k] (or None), log π [k, V] and π [k, V] (or None) of logits u.
    Every path (no grad, checkpointed, fused) goes through here, so S and S⁺ agree bit for bit
    where the parameters do."""
    log_p = torch.log_softmax(u, dim=-1)                              # [k, V]
    logprob = log_p.gather(1, targets[:, None])[:, 0]
    if not entropy:
        return logprob, None, log_p, None
    p = log_p.exp()
    return logprob, -(p * log_p).sum(-1), log_p, p


def _head_outputs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                  scale: LogitScale, entropy: bool):
    """For [k, d] hidden states: log softmax(z/τ)[target] [k] fp32, and with `entropy` also
    h = −Σ_a π_a log π_a [k] fp32 (else None); differentiable."""
    logprob, ent, _, _ = _token_values(_scaled_logits(head, hidden, scale), targets, entropy)
    return logprob, ent


def _head_input_grads(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                      scale: LogitScale, entropy: bool):
    """log π [k], h [k] and their input-gradients ∂/∂hidden [k, d] (∂h: None without entropy)
    in closed form, for a frozen Linear head: with u the scaled logits, ∂log π_y/∂u = e_y − π,
    ∂h/∂u = −π⊙(log π + h), then through /τ, the softcap and the head's weight, the two
    stacked into one matmul."""
    u = _scaled_logits(head, hidden, scale)                           # [k, V]
    logprob, ent, log_p, p = _token_values(u, targets, entropy)
    p = log_p.exp() if p is None else p
    grads = [-p]
    grads[0].scatter_add_(1, targets[:, None], torch.ones_like(logprob)[:, None])
    if entropy:
        grads.append(-p * (log_p + ent[:, None]))
    g = torch.cat(grads) if entropy else grads[0]                     # [k or 2k, V]
    if scale.temperature != 1.0:
        g = g / scale.temperature
    if scale.softcap:            # d(c·tanh(z/c))/dz = 1 − tanh², tanh = u·τ/c
        g = g * (1 - (u * (scale.temperature / scale.softcap)) ** 2).repeat(len(grads), 1)
    x_grad = (g.to(head.weight.dtype) @ head.weight).to(hidden.dtype)  # [k or 2k, d]
    k = hidden.shape[0]
    return logprob, ent, x_grad[:k], (x_grad[k:] if entropy else None)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device without a stream synchronisation on CUDA (pinned, non-blocking; the
    caching host allocator keeps the pinned block until the copy has run)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class ChunkInputs:
    """One chunk of sequences on the device, trimmed to its own extent.

    Fields: input_ids, attention_mask, position_ids: [n, P'+L'] long; response_index: [M]
    positions of the response tokens in the flattened [n·L'] response window; targets: [M]
    token ids there; owner: [M] the chunk row each belongs to; rows: n; prompt_width: P';
    response_width: L'.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    response_index: torch.Tensor
    targets: torch.Tensor
    owner: torch.Tensor
    rows: int
    prompt_width: int
    response_width: int


class TeacherForcer:
    """Computes S for slices of a Batch on the device, with the generation's mask/positions."""

    def __init__(self, model: torch.nn.Module, batch: Batch, temperature: float,
                 device: torch.device, autocast_dtype: torch.dtype | None):
        lm = causal_lm(model)
        self.decoder = getattr(lm, lm.base_model_prefix)
        self.head = lm.get_output_embeddings()
        self.scale = LogitScale(temperature, getattr(lm.config, "final_logit_softcapping", None))
        self.batch, self.temperature, self.device = batch, temperature, device
        self.autocast_dtype = autocast_dtype
        self.vocab = self.head.weight.shape[0]
        # the fused head needs no gradient of the head's own parameters
        self.fused_head = not any(p.requires_grad for p in self.head.parameters())

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def chunk_inputs(self, rows: torch.Tensor) -> ChunkInputs:
        """Device tensors for the rows, trimmed to the chunk's own prompt/response extent
        (columns that are padding for every row in the chunk carry no information). Response
        positions are found on the host, so the device never waits on a data-dependent size."""
        b = self.batch
        width = int(b.response_mask[rows].sum(1).max())                  # L' ≤ L
        resp = b.response_mask[rows, :width]                              # [n, L']
        p = int(b.prompt_lengths[rows].max())                             # P' ≤ P
        left, right = b.prompt_width - p, b.prompt_width + width
        ids = b.input_ids[rows, left:right]                               # [n, P'+L']
        attn = b.attention_mask[rows, left:right]
        pos = (attn.cumsum(-1) - 1).clamp(min=0)       # as generate() assigns them
        sel = torch.nonzero(resp.reshape(-1), as_tuple=True)[0]           # [M] in n·L'
        targets = ids[:, p:].reshape(-1)[sel]                             # [M]
        dev = self.device
        return ChunkInputs(input_ids=to_device(ids, dev), attention_mask=to_device(attn, dev),
                           position_ids=to_device(pos, dev), response_index=to_device(sel, dev),
                           targets=to_device(targets, dev),
                           owner=to_device(sel // max(width, 1), dev), rows=len(rows),
                           prompt_width=p, response_width=width)

    def tokens(self, rows: torch.Tensor, *, grad: bool, entropy: bool = False,
               fused: bool = True) -> TokenOutputs:
        """Per response token of the given sequences, on the device. With grad=True the
        decoder keeps its graph to the trainable parameters; the LM head is then either fused
        (`head` holds ∂log π_t/∂hidden_t and ∂h_t/∂hidden_t, computed chunk by chunk in the
        forward, so the backward never runs the head again) or, when the head itself has
        trainable parameters, checkpointed inside the graph."""
        x = self.chunk_inputs(rows)
        p, width = x.prompt_width, x.response_width
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self._autocast():
            hidden = self.decoder(input_ids=x.input_ids, attention_mask=x.attention_mask,
                                  position_ids=x.position_ids, use_cache=False).last_hidden_state
            # position t predicts token t+1: hidden at P'-1 … P'+L'-2 scores response tokens
            h = hidden[:, p - 1:p - 1 + width].flatten(0, 1)[x.response_index]   # [M, d]
            if grad and fused and self.fused_head:
                logprob, ent, head = self._fused_head(h, x.targets, entropy)
            else:
                logprob, ent = self._chunked_head(h, x.targets, grad, entropy)   # [M] each
                head = None
        return TokenOutputs(logprob=logprob, entropy=ent, owner=x.owner, rows=x.rows,
                            head=head)

    def logprobs(self, rows: torch.Tensor, *, grad: bool) -> torch.Tensor:
        """S for the given sequence indices. Returns [n] fp32 on the device (with grad: a graph
        through the checkpointed head, for callers that backward through S itself)."""
        return self.tokens(rows, grad=grad, fused=False).sequence_sum("logprob")

    def _chunked_head(self, h: torch.Tensor, targets: torch.Tensor, grad: bool, entropy: bool):
        step = max(1, LOGIT_CHUNK_ELEMENTS // self.vocab)
        logprobs, entropies = [], []
        for i in range(0, h.shape[0], step):
            args = (self.head, h[i:i + step], targets[i:i + step], self.scale, entropy)
            if grad:
                lp, ent = checkpoint(_head_outputs, *args, use_reentrant=False)
            else:
                lp, ent = _head_outputs(*args)
            logprobs.append(lp)
            entropies.append(ent)
        if not logprobs:
            empty = h.new_zeros(0, dtype=torch.float32)
            return empty, (empty if entropy else None)
        return torch.cat(logprobs), (torch.cat(entropies) if entropy else None)

    def _fused_head(self, h: torch.Tensor, targets: torch.Tensor, entropy: bool):
        """The head on token chunks with its input-gradients taken at once (as fused linear
        cross-entropy kernels do): log π [M], h [M] (detached) and HeadGradients."""
        step = max(1, LOGIT_CHUNK_ELEMENTS // self.vocab)
        values: list[list[torch.Tensor]] = [[], [], [], []]     # lp, h, ∂lp/∂x, ∂h/∂x
        for i in range(0, h.shape[0], step):
            x = h[i:i + step].detach()                                      # [k, d]
            for k, v in enumerate(self._chunk_input_grads(x, targets[i:i + step], entropy)):
                if v is not None:
                    values[k].append(v)
        lp, ent, g_lp, g_ent = (torch.cat(v) if v else None for v in values)
        if lp is None:
            lp, g_lp = h.new_zeros(0, dtype=torch.float32), h.new_zeros(h.shape)
            ent, g_ent = (lp, g_lp) if entropy else (None, None)
        return lp, ent, HeadGradients(hidden=h, logprob=g_lp, entropy=g_ent)

    def _chunk_input_grads(self, x: torch.Tensor, targets: torch.Tensor, entropy: bool):
        """(log π, h, ∂log π/∂x, ∂h/∂x) of one token chunk: closed form for a Linear head,
        else autograd through the head (each token's value depends on its own row only, so
        the gradient of the sum is per token)."""
        with torch.no_grad():
            if type(self.head) is torch.nn.Linear:
                return _head_input_grads(self.head, x, targets, self.scale, entropy)
        with torch.enable_grad():
            x = x.requires_grad_(True)
            lp, ent = _head_outputs(self.head, x, targets, self.scale, entropy)
            outs = [lp] + ([ent] if entropy else [])
            grads = torch.autograd.grad([o.sum() for o in outs], [x] * len(outs))
        return lp.detach(), (ent.detach() if entropy else None), grads[0], \
            (grads[1] if entropy else None)


@dataclass
class HeadGradients:
    """The fused head's input-gradients of one chunk.

    Fields: hidden: the decoder's outputs at the response tokens, [M, d] with the graph to the
    trainable parameters; logprob: ∂log π_t/∂hidden_t [M, d]; entropy: ∂h_t/∂hidden_t [M, d]
    (None when not asked for). A per-sequence objective Σ_t a_t log π_t + Σ_t b_t h_t (a, b
    detached) has hidden-gradient a⊙logprob + b⊙entropy, whose backward is the decoder's only.
    """

    hidden: torch.Tensor
    logprob: torch.Tensor
    entropy: torch.Tensor | None


@dataclass
class TokenOutputs:
    """One chunk's response tokens, on the device.

    Fields: logprob [M] fp32 log π_τ(y_t | y_<t); entropy [M] fp32 h_t, or None when not asked
    for; owner [M] long, the chunk row of each token (tokens of a row are contiguous and in
    order); rows: n; head: the fused head's gradients (then logprob and entropy carry no graph),
    or None (no grad, or the head checkpointed inside the graph).
    """

    logprob: torch.Tensor
    entropy: torch.Tensor | None
    owner: torch.Tensor
    rows: int
    head: HeadGradients | None = None

    def sequence_sum(self, field: str) -> torch.Tensor:
        """Σ over each row's tokens of `logprob` or `entropy`, [n] fp32."""
        values = getattr(self, field)
        return values.new_zeros(self.rows).index_add(0, self.owner, values)


@dataclass
class SequenceValues:
    """No-grad sums for every sequence of the batch, on the host.

    Fields: logprob S [N] fp32; entropy f = Σ_t h_t [N] fp32, or None when not asked for."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None


def sequence_values(forcer: TeacherForcer, chunks: list[torch.Tensor], entropy: bool,
                    on_chunk=None) -> SequenceValues:
    """No-grad S (and f) for the sequences in `chunks`, chunk by chunk, into [N] host tensors
    (rows not in any chunk stay 0). The chunks' results stay on the device until the end: one
    transfer, no synchronisation per chunk."""
    n = forcer.batch.num_sequences
    lps, ents = [], []
    for k, rows in enumerate(chunks):
        tokens = forcer.tokens(rows, grad=False, entropy=entropy)
        lps.append(tokens.sequence_sum("logprob"))                        # [n] device
        if entropy:
            ents.append(tokens.sequence_sum("entropy"))
        if on_chunk:
            on_chunk(k + 1, len(chunks))
    out = SequenceValues(logprob=torch.zeros(n), entropy=torch.zeros(n) if entropy else None)
    if lps:
        rows = torch.cat(chunks)
        out.logprob[rows] = torch.cat(lps).cpu()
        if entropy:
            out.entropy[rows] = torch.cat(ents).cpu()
    return out


def all_logprobs(forcer: TeacherForcer, chunks: list[torch.Tensor], on_chunk=None
                 ) -> torch.Tensor:
    """No-grad S for every sequence, chunk by chunk. Returns [N] fp32 on the host."""
    return sequence_values(forcer, chunks, False, on_chunk).logprob


def all_logprobs_subset(forcer: TeacherForcer, rows: torch.Tensor, size: int) -> torch.Tensor:
    """No-grad S of some sequences, in chunks of `size` (another chunking than the probe's, for
    the noise-floor check). Returns [len(rows)] fp32 on the host, in the order of rows."""
    return all_logprobs(forcer, list(rows.split(size)))[rows]
