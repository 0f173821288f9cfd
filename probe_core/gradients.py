"""Per-unit gradient summaries X_u = Σ c^X ∇S and Y_u = Σ c^Y ∇S from one forward with grad
per chunk.

Two ways to get both weighted sums from one graph:
- `hooks` (fast): one backward of Σ_i S_i. Sequences in a chunk do not interact, so the
  output-gradient that reaches a LoRA linear layer at sequence i's positions is ∂S_i/∂out_i.
  Forward hooks keep each layer's input x [n, T, d_in]; tensor hooks receive the
  output-gradient g [n, T, d_out] and add Σ_i c_i Σ_t g_it x_itᵀ for c = c^X and c^Y (the
  per-sample-gradient trick of Opacus / book-keeping DP, Bu et al. 2022). Needs every trainable
  parameter to be the weight of a bias-free nn.Linear that sees [n, T, d] inputs (LoRA A/B).
- `two_backward`: autograd.grad of Σ c^X S and of Σ c^Y S with retain_graph. Works for any
  trainable parameter; used when `hooks` does not apply, and as the reference in tests.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from probe_core.checkpoint import causal_lm
from probe_core.teacher_forcing import TeacherForcer, to_device


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
        self.coef: torch.Tensor | None = None      # [2, n]
        self.acc: torch.Tensor | None = None       # [2, P] device accumulator
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
    """One unit's gradient summaries and the passes they took.

    Fields: x X_u, y Y_u (fp32 [P] on the device); forward_grad, backward: sequences through
    each pass kind.
    """

    x: torch.Tensor
    y: torch.Tensor
    forward_grad: int
    backward: int


class GradientAccumulator:
    """Runs phase 2: for each unit, for each chunk, one forward with grad and X/Y from it."""

    def __init__(self, forcer: TeacherForcer, model: torch.nn.Module, flat: FlatParams,
                 method: str = "auto"):
        self.forcer, self.flat = forcer, flat
        lm = forcer.decoder
        if method == "auto":
            method = "hooks" if _LinearGradCapture.applicable(flat, causal_lm(model)) \
                else "two_backward"
        self.method = method
        self.capture = _LinearGradCapture(flat, lm) if method == "hooks" else None

    def unit(self, chunks: list[torch.Tensor], coef_x: torch.Tensor, coef_y: torch.Tensor,
             on_chunk=None) -> UnitGradient:
        """X_u, Y_u for one unit.

        Args: chunks: sequence indices; coef_x, coef_y: [N] host coefficients (float64);
        on_chunk: called after each chunk."""
        dev = self.forcer.device
        acc = torch.zeros(2, self.flat.numel, dtype=torch.float32, device=dev)   # [2, P]
        backwards = 0
        rows_u = torch.cat(chunks)
        coefs = to_device(torch.stack([coef_x[rows_u], coef_y[rows_u]]).float(), dev)  # [2, n_u]
        start = 0
        for rows in chunks:
            coef = coefs[:, start:start + len(rows)]                          # [2, n]
            start += len(rows)
            if self.method == "hooks":
                self.capture.coef, self.capture.acc = coef, acc
                with self.capture:
                    s = self.forcer.logprobs(rows, grad=True)                   # [n]
                torch.autograd.grad(s.sum(), self.capture.backward_inputs(), allow_unused=True)
                backwards += len(rows)
            else:
                s = self.forcer.logprobs(rows, grad=True)
                for k in range(2):
                    g = torch.autograd.grad((coef[k] * s).sum(), self.flat.params,
                                            retain_graph=k == 0, allow_unused=True)
                    acc[k] += self.flat.flatten(g)
                backwards += 2 * len(rows)
            if on_chunk:
                on_chunk()
        return UnitGradient(x=acc[0], y=acc[1], forward_grad=len(rows_u), backward=backwards)
