"""Sequence log-probabilities S = Σ_response log softmax(z/τ)[token], chunked so that logits
never exist as a full fp32 [tokens, vocab] tensor: the LM head and cross-entropy run over token
chunks, and with grad each chunk is recomputed in backward (activation checkpointing)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from probe_core.checkpoint import causal_lm
from probe_core.rollouts import Batch

LOGIT_CHUNK_ELEMENTS = 1 << 24   # ≤ 64 MiB of fp32 logits per token chunk


def _token_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float, softcap: float | None) -> torch.Tensor:
    """log softmax(head(hidden)/τ)[target] for [k, d] hidden states. Returns [k] fp32."""
    logits = head(hidden).float()                                     # [k, V]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if temperature != 1.0:        # x/1 == x exactly: skip a [k, V] pass at τ = 1
        logits = logits / temperature
    return -F.cross_entropy(logits, targets, reduction="none")


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
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)
        self.batch, self.temperature, self.device = batch, temperature, device
        self.autocast_dtype = autocast_dtype
        self.vocab = self.head.weight.shape[0]

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

    def logprobs(self, rows: torch.Tensor, *, grad: bool) -> torch.Tensor:
        """S for the given sequence indices. Returns [n] fp32 on the device (with a graph to the
        trainable parameters when grad=True)."""
        x = self.chunk_inputs(rows)
        p, width = x.prompt_width, x.response_width
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self._autocast():
            hidden = self.decoder(input_ids=x.input_ids, attention_mask=x.attention_mask,
                                  position_ids=x.position_ids, use_cache=False).last_hidden_state
            # position t predicts token t+1: hidden at P'-1 … P'+L'-2 scores response tokens
            h = hidden[:, p - 1:p - 1 + width].flatten(0, 1)[x.response_index]   # [M, d]
            token_lp = self._chunked_logprobs(h, x.targets, grad)        # [M]
        s = torch.zeros(x.rows, dtype=torch.float32, device=self.device)
        return s.index_add(0, x.owner, token_lp)

    def _chunked_logprobs(self, h: torch.Tensor, targets: torch.Tensor, grad: bool):
        step = max(1, LOGIT_CHUNK_ELEMENTS // self.vocab)
        parts = []
        for i in range(0, h.shape[0], step):
            args = (self.head, h[i:i + step], targets[i:i + step], self.temperature,
                    self.softcap)
            if grad:
                parts.append(checkpoint(_token_logprobs, *args, use_reentrant=False))
            else:
                parts.append(_token_logprobs(*args))
        return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def all_logprobs(forcer: TeacherForcer, chunks: list[torch.Tensor], on_chunk=None
                 ) -> torch.Tensor:
    """No-grad S for every sequence, chunk by chunk. Returns [N] fp32 on the host. The chunks'
    results stay on the device until the end: one transfer, no synchronisation per chunk."""
    out = torch.empty(forcer.batch.num_sequences, dtype=torch.float32)
    parts = []
    for k, rows in enumerate(chunks):
        parts.append(forcer.logprobs(rows, grad=False))                   # [n] device
        if on_chunk:
            on_chunk(k + 1, len(chunks))
    if parts:
        out[torch.cat(chunks)] = torch.cat(parts).cpu()
    return out


def all_logprobs_subset(forcer: TeacherForcer, rows: torch.Tensor, size: int) -> torch.Tensor:
    """No-grad S of some sequences, in chunks of `size` (another chunking than the probe's, for
    the noise-floor check). Returns [len(rows)] fp32 on the host, in the order of rows."""
    return all_logprobs(forcer, list(rows.split(size)))[rows]
