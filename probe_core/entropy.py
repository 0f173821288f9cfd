"""The entropy a probe measures (request `entropy`), per sequence, from one gradient forward.

For response y of prompt p, T = its tokens including the EOS, h_t the full next-token entropy
at position t at temperature τ, log π_t = log π_τ(y_t | y_<t):
- `estimator`: `full_vocabulary` scores a sequence by f = Σ_t h_t (Rao-Blackwellized),
  `sampled` by f = −S = −Σ_t log π_t (the first round's). Both have E[f | p] = H_seq(p).
- `normalization`: `token_mean` H = E_p E_y[f] / E_p E_y[T] (what TRL and verl log);
  `sequence` H = E_p E_y[f] (nats per response, the first round's).

The score-function part of the full-vocabulary gradient weights log π_k by the entropy-to-go
Γ_k = Σ_{j>k} h_j (h is a function of y_<j, so only later positions depend on y_k); the
sequence's constant baseline uses m = (1/T) Σ_k Γ_k of the *other* responses (summaries.py).
docs/method.md derives each form.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from probe_core.estimators.ustat import Concatenable
from probe_core.spec import EntropySpec
from probe_core.teacher_forcing import TokenOutputs


@dataclass
class SequenceStats(Concatenable):
    """What a sequence's own gradient forward tells about it (detached).

    Fields, float32 [n] each (device while the pass runs, host after):
        logprob: S = Σ_t log π_t
        length: T, response tokens including the EOS
        entropy: f, the sequence's entropy estimate (Σ_t h_t, or −S for `sampled`)
        baseline: b, the statistic whose leave-one-out mean over the prompt's other responses
            baselines this sequence's score term (S for `sampled`; m = (1/T) Σ_k Γ_k for
            `full_vocabulary`)
    """

    logprob: torch.Tensor
    length: torch.Tensor
    entropy: torch.Tensor
    baseline: torch.Tensor

    def cpu(self) -> SequenceStats:
        return SequenceStats(logprob=self.logprob.cpu(), length=self.length.cpu(),
                             entropy=self.entropy.cpu(), baseline=self.baseline.cpu())

    def rows(self, index: torch.Tensor) -> SequenceStats:
        return SequenceStats(logprob=self.logprob[index], length=self.length[index],
                             entropy=self.entropy[index], baseline=self.baseline[index])


def entropy_to_go(tokens: TokenOutputs) -> torch.Tensor:
    """Γ_k = Σ_{j>k} h_j within each row, detached, float64 [M] (float64: a running sum over
    all M tokens of the chunk)."""
    h = tokens.entropy.detach().double()                                  # [M]
    total = h.new_zeros(tokens.rows).index_add(0, tokens.owner, h)        # f per row [n]
    before_row = total.cumsum(0) - total                                  # Σ of earlier rows
    through_k = h.cumsum(0) - before_row[tokens.owner]                    # Σ_{j≤k}, same row
    return total[tokens.owner] - through_k


def on_policy_z(stats: SequenceStats) -> float | None:
    """z of the mean of S + f over the sequences, f = Σ_t h_t their full-vocabulary entropy.

    For a response sampled from π_τ each token's log π_τ + h_t has mean 0 given its prefix, so
    E[S + f] = 0 and, over independent responses, z is about N(0, 1). Far from 0, the responses
    were not sampled from this checkpoint's policy at this temperature (another checkpoint,
    temperature, or top_p/top_k). None with fewer than 2 sequences or no spread."""
    d = stats.logprob.double() + stats.entropy.double()
    n = d.numel()
    sd = float(d.std()) if n >= 2 else 0.0
    return None if sd == 0.0 else float(d.mean()) / (sd / math.sqrt(n))


def sequence_stats(tokens: TokenOutputs, spec: EntropySpec) -> SequenceStats:
    """The detached per-sequence numbers of one chunk's forward."""
    s = tokens.sequence_sum("logprob").detach()                           # [n]
    ones = torch.ones_like(tokens.logprob, dtype=torch.float32)
    length = ones.new_zeros(tokens.rows).index_add(0, tokens.owner, ones)  # [n]
    if spec.estimator == "sampled":
        return SequenceStats(logprob=s, length=length, entropy=-s, baseline=s)
    f = tokens.sequence_sum("entropy").detach()
    to_go = entropy_to_go(tokens)                                         # [M]
    mean_to_go = to_go.new_zeros(tokens.rows).index_add(0, tokens.owner, to_go) / length
    return SequenceStats(logprob=s, length=length, entropy=f, baseline=mean_to_go.float())


@dataclass
class Objective:
    """A per-sequence objective O_i of one chunk, as a backward takes it: either `values` [n]
    with a graph (autograd path), or, with the fused head, `token_grads` [M, d] = ∂O_i/∂hidden_t
    at each of sequence i's tokens, `hidden` [M, d] carrying the graph and `owner` [M]."""

    values: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    token_grads: torch.Tensor | None = None
    owner: torch.Tensor | None = None

    def backward_args(self, coef: torch.Tensor | None = None):
        """(outputs, grad_outputs) for autograd.grad of Σ_i coef_i O_i (coef None: all 1)."""
        if self.values is not None:
            return (self.values if coef is None else coef * self.values).sum(), None
        if coef is None:
            return self.hidden, self.token_grads
        weight = coef.to(self.token_grads.dtype)[self.owner, None]           # [M, 1]
        return self.hidden, weight * self.token_grads


def logprob_objective(tokens: TokenOutputs) -> Objective:
    """S_i = Σ_t log π_t."""
    if tokens.head is not None:
        return Objective(hidden=tokens.head.hidden, token_grads=tokens.head.logprob,
                         owner=tokens.owner)
    return Objective(values=tokens.sequence_sum("logprob"))


def pathwise_objective(tokens: TokenOutputs) -> Objective:
    """F = Σ_k h_k + Σ_k sg(Γ_k)·log π_k per row: ∇F = Σ_k ∇h_k + Σ_k Γ_k ∇log π_k, the
    full-vocabulary entropy gradient before its baseline."""
    to_go = entropy_to_go(tokens)                                         # [M], no graph
    if tokens.head is not None:
        g = tokens.head
        return Objective(hidden=g.hidden, owner=tokens.owner,
                         token_grads=g.entropy + to_go.to(g.logprob.dtype)[:, None] * g.logprob)
    per_token = tokens.entropy + to_go.to(tokens.logprob.dtype) * tokens.logprob   # [M]
    return Objective(values=per_token.new_zeros(tokens.rows).index_add(0, tokens.owner,
                                                                       per_token))


def bonus_objective(tokens: TokenOutputs) -> Objective:
    """E_i = Σ_t h_t through the logits only: the gradient of TRL's entropy bonus (no
    score-function term), issue 15."""
    if tokens.head is not None:
        return Objective(hidden=tokens.head.hidden, token_grads=tokens.head.entropy,
                         owner=tokens.owner)
    return Objective(values=tokens.sequence_sum("entropy"))


@dataclass
class EntropyScalars:
    """Batch scalars held fixed in δH₁ (like κ). token_mean: ratio Ĥ_tok = Σf/ΣT and mean
    length Ê[T]; sequence: none (ratio 0, mean_length 1 leave X^seq unchanged)."""

    ratio: float
    mean_length: float

    def entropy_vector(self, seq: torch.Tensor, length: torch.Tensor | None) -> torch.Tensor:
        """X = (X^seq + Ĥ_tok·N)/Ê[T] in place on `seq` (token_mean), or X^seq (sequence)."""
        if length is not None:
            seq.add_(length, alpha=self.ratio).div_(self.mean_length)
        return seq


def batch_scalars(stats: SequenceStats, spec: EntropySpec) -> EntropyScalars:
    if spec.normalization == "sequence":
        return EntropyScalars(ratio=0.0, mean_length=1.0)
    f, t = stats.entropy.double(), stats.length.double()
    return EntropyScalars(ratio=float(f.sum() / t.sum()), mean_length=float(t.mean()))
