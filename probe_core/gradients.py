"""Weighted sums of per-sequence gradients Σ_i w_ri ∇S_i (and Σ_i w_ri ∇F_i) per unit, from one
forward with grad per chunk (summaries.py says which rows and how they combine).

Two ways to get many weighted sums from one graph:
- `hooks` (fast): one backward of Σ_i S_i (and one of Σ_i F_i). Sequences in a chunk do not
  interact, so the output-gradient that reaches a LoRA linear layer at sequence i's positions
  is ∂S_i/∂out_i. Forward hooks keep each layer's input x [n, T, d_in]; tensor hooks receive
  the output-gradient g [n, T, d_out] and add Σ_i w_ri Σ_t g_it x_itᵀ for every row r of the
  weight matrix [R, n] (the per-sample-gradient trick of Opacus / book-keeping DP, Bu et al.
  2022). Needs every trainable parameter to be the weight of a bias-free nn.Linear that sees
  [n, T, d] inputs (LoRA A/B).
- `two_backward`: autograd.grad of Σ_i w_ri S_i for each row r that has a non-zero weight in
  the chunk, with retain_graph. Works for any trainable parameter; used when `hooks` does not
  apply, and as the reference in tests (the name is the first round's, when there were two
  rows).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from probe_core.checkpoint import causal_lm
from probe_core.entropy import (Objective, SequenceStats, bonus_objective, logprob_objective,
                                pathwise_objective, sequence_stats)
from probe_core.spec import GradMethod
from probe_core.summaries import SummaryPlan, UnitSummary
from probe_core.teacher_forcing import TeacherForcer


@dataclass
class FlatParams:
    """Trainable parameters laid end to end in named_parameters() order."""

    params: list[torch.nn.Parameter]
    offsets: list[int]
    numel: int

    @classmethod
    def of(cls, params: list[torch.nn.Parameter]) -> FlatParams:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        return cls(params, offsets, total)

    def flatten(self, tensors) -> torch.Tensor:
        """Concatenate per-parameter tensors (None → zeros) into one fp32 vector."""
        return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).float()
                          for t, p in zip(tensors, self.params)])


class _LinearGradCapture:
    """Hooks that add c-weighted per-sequence weight gradients of bias-free Linear layers.

    The backward is asked only for what the hooks need (`backward_inputs`): the outputs of
    hooked layers that feed another hooked layer (LoRA A → B: the A outputs, [n, T, r]) and the
    weights of hooked layers that stand alone. Autograd then computes no LoRA weight gradient
    of its own (the hooks compute them, weighted), and nothing below the first LoRA layer.
    """

    def __init__(self, flat: FlatParams, model: torch.nn.Module):
        where = {id(p): k for k, p in enumerate(flat.params)}
        self.flat, self.layers, self.handles = flat, [], []
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and id(module.weight) in where:
                self.layers.append((module, where[id(module.weight)]))
        self.coef: torch.Tensor | None = None      # [R, n] weights of the current backward
        self.acc: torch.Tensor | None = None       # [R, P] device accumulator
        # this chunk's hooked outputs, in call order: (weak ref, weight, whether its input was
        # one); weak, so that outputs no hooked layer reads (LoRA B, [n, T, d_out]) are not kept
        self._outputs: list[tuple[weakref.ref, torch.nn.Parameter, bool]] = []
        self._index: dict[int, int] = {}              # id(output) → position in _outputs
        self._feeding: dict[int, torch.Tensor] = {}   # position → output a hooked layer read

    @staticmethod
    def applicable(flat: FlatParams, model: torch.nn.Module) -> bool:
        covered = set()
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and (
                    m.bias is None or not m.bias.requires_grad):
                covered.add(id(m.weight))
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") \
            else None
        head_params = {id(p) for p in lm_head.parameters()} if lm_head is not None else set()
        return all(id(p) in covered and id(p) not in head_params for p in flat.params)

    def __enter__(self):
        self._clear()
        for module, k in self.layers:
            self.handles.append(module.register_forward_hook(self._forward_hook(k)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def backward_inputs(self) -> list[torch.Tensor]:
        """What autograd.grad must reach so that every hooked output's gradient is computed."""
        out, weights = list(self._feeding.values()), set()
        for k, (_, w, fed) in enumerate(self._outputs):
            if not fed and k not in self._feeding and id(w) not in weights:
                out.append(w)                   # a hooked layer that stands alone
                weights.add(id(w))
        self._clear()
        return out

    def _clear(self) -> None:
        self._outputs.clear()
        self._index.clear()
        self._feeding.clear()

    def _forward_hook(self, k: int):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0]
            k_in = self._index.get(id(x))
            fed = k_in is not None and self._outputs[k_in][0]() is x   # B reading A's output
            if fed:
                self._feeding[k_in] = x
            self._index[id(output)] = len(self._outputs)
            self._outputs.append((weakref.ref(output), module.weight, fed))
            x = x.detach()                                                # [n, T, d_in]
            output.register_hook(lambda g: self._add(k, x, g))
        return hook

    def _add(self, k: int, x: torch.Tensor, g: torch.Tensor) -> None:
        """acc[:, layer k] += Σ_i coef[:, i] g_iᵀ x_i, with x [n, T, d_in], g [n, T, d_out]."""
        n, d_in, d_out = x.shape[0], x.shape[-1], g.shape[-1]
        per_seq = torch.bmm(g.float().reshape(n, -1, d_out).transpose(1, 2),
                            x.float().reshape(n, -1, d_in))               # [n, d_out, d_in]
        off = self.flat.offsets[k]
        self.acc[:, off:off + d_out * d_in].addmm_(self.coef, per_seq.view(n, -1))


@dataclass
class UnitGradient:
    """One unit's gradient summaries, its sequences' statistics and the passes they took.

    Fields: summary (UnitSummary, device fp32 [P] vectors); stats: the unit's SequenceStats
    (device, in the unit's sequence order); forward_grad, backward: sequences through each pass
    kind (a backward of a chunk of n sequences counts n).
    """

    summary: UnitSummary
    stats: SequenceStats
    forward_grad: int
    backward: int


class GradientAccumulator:
    """The gradient pass: per unit, per chunk, one forward with grad, the sequences' statistics
    from it, then one backward of Σ S (and, full_vocabulary, one of Σ F) whose per-sequence
    output-gradients are weighted into the plan's rows."""

    def __init__(self, forcer: TeacherForcer, model: torch.nn.Module, flat: FlatParams,
                 method: GradMethod = "auto"):
        self.forcer, self.flat = forcer, flat
        lm = forcer.decoder
        if method == "auto":
            method = "hooks" if _LinearGradCapture.applicable(flat, causal_lm(model)) \
                else "two_backward"
        self.method = method
        self.capture = _LinearGradCapture(flat, lm) if method == "hooks" else None

    def unit(self, chunks: list[torch.Tensor], plan: SummaryPlan, prompt_weight: torch.Tensor,
             on_chunk=None) -> UnitGradient:
        """The unit made of `chunks` (its sequences, prompt by prompt, G per prompt).

        Args: plan: the rows and their combination; prompt_weight: [k] float64, each prompt's
        weight in the unit; on_chunk: called after each chunk."""
        dev, numel, g = self.forcer.device, self.flat.numel, plan.group_size
        k = len(prompt_weight)
        acc_lp = torch.zeros(k * plan.num_rows, numel, dtype=torch.float32, device=dev)
        acc_pw = torch.zeros(k, numel, dtype=torch.float32, device=dev) if plan.pathwise \
            else None
        acc_bonus = torch.zeros(k, numel, dtype=torch.float32, device=dev) if plan.bonus \
            else None
        first = int(chunks[0][0])
        stats, backward = [], 0
        for rows in chunks:
            prompt = (rows - first) // g                                   # [n] in 0..k−1
            objectives, chunk_stats = self._forward(rows, plan)
            stats.append(chunk_stats)
            targets = [(objectives["logprob"], acc_lp,
                        plan.logprob_weights(chunk_stats, rows, prompt, k))]
            onehot = torch.zeros(k, len(rows), device=dev)
            onehot[prompt.to(dev), torch.arange(len(rows), device=dev)] = 1.0       # [k, n]
            if plan.pathwise:
                targets.append((objectives["pathwise"], acc_pw, onehot))
            if plan.bonus:
                targets.append((objectives["bonus"], acc_bonus, onehot))
            backward += self._backward(targets) * len(rows)
            if on_chunk:
                on_chunk()
        unit_stats = SequenceStats.cat(stats)
        summary = plan.combine(acc_lp.view(k, plan.num_rows, numel), acc_pw, unit_stats,
                               prompt_weight.to(dev, torch.float32), acc_bonus)
        n_seq = sum(len(c) for c in chunks)
        return UnitGradient(summary=summary, stats=unit_stats, forward_grad=n_seq,
                            backward=backward)

    def _forward(self, rows: torch.Tensor, plan: SummaryPlan
                 ) -> tuple[dict[str, Objective], SequenceStats]:
        """The chunk's objectives by name ("logprob" S; "pathwise" F for full_vocabulary;
        "bonus" E = Σ_t h_t with an entropy bonus) and its statistics."""
        with self.capture if self.capture is not None else contextlib.nullcontext():
            tokens = self.forcer.tokens(rows, grad=True, entropy=plan.pathwise or plan.bonus)
        if self.capture is not None:
            self.inputs = self.capture.backward_inputs()
        objectives = {"logprob": logprob_objective(tokens)}
        if plan.pathwise:
            objectives["pathwise"] = pathwise_objective(tokens)
        if plan.bonus:
            objectives["bonus"] = bonus_objective(tokens)
        return objectives, sequence_stats(tokens, plan.spec)

    def _backward(self, targets: list[tuple[Objective, torch.Tensor, torch.Tensor]]) -> int:
        """For each (objective, accumulator [R, P], weights [R, n]): acc += Σ_i w_ri ∇O_i.
        Returns the number of backwards run over the chunk."""
        count = 0
        for j, (objective, acc, weights) in enumerate(targets):
            retain = j < len(targets) - 1
            if self.method == "hooks":
                self.capture.coef, self.capture.acc = weights, acc
                outputs, grad_outputs = objective.backward_args()
                torch.autograd.grad(outputs, self.inputs, grad_outputs, retain_graph=retain,
                                    allow_unused=True)
                count += 1
                continue
            used = [r for r in range(weights.shape[0]) if bool(weights[r].any())]
            for q, r in enumerate(used):
                outputs, grad_outputs = objective.backward_args(weights[r])
                grads = torch.autograd.grad(outputs, self.flat.params, grad_outputs,
                                            retain_graph=retain or q < len(used) - 1,
                                            allow_unused=True)
                acc[r] += self.flat.flatten(grads)
                count += 1
        return count
