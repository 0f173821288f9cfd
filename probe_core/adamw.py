"""The next AdamW step exactly as torch.optim.AdamW takes it, in flat float64 vectors.

With g = −κȲ (the gradient of L = −(1/B) Σ_n Σ_g c^Y S) and the saved state (m, v, t):
    t' = t+1, m' = β1 m + (1−β1) g, v' = β2 v + (1−β2) g²,
    bc1 = 1−β1^t', bc2 = 1−β2^t', denom = √v'/√bc2 + ε,
    θ⁺ = θ(1 − lr·wd) − (lr/bc1) m'/denom.
With D = 1/(bc1·denom): Δθ = lr(1−β1)κ D⊙Ȳ − lr β1 D⊙m − lr wd θ.
Hyper-parameters may differ by param group, so they are per-element vectors here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe_core.optimizer_state import ParamState


CLIP_EPS = 1e-6       # torch.nn.utils.clip_grad_norm_'s guard against a zero norm


@dataclass
class AdamWState:
    """The saved AdamW state and each parameter's hyper-parameters, per element, float64 [P]:
    lr, beta1, beta2, eps, wd (weight decay), step (t before the step), m (exp_avg),
    v (exp_avg_sq)."""

    lr: torch.Tensor
    beta1: torch.Tensor
    beta2: torch.Tensor
    eps: torch.Tensor
    wd: torch.Tensor
    step: torch.Tensor     # t before the step
    m: torch.Tensor
    v: torch.Tensor

    @classmethod
    def from_states(cls, states: list[ParamState], lr_override: float | None) -> AdamWState:
        sizes = torch.tensor([s.exp_avg.numel() for s in states])

        def per_elem(values):
            return torch.repeat_interleave(torch.tensor(values, dtype=torch.float64), sizes)

        lr = [lr_override if lr_override is not None else s.lr for s in states]
        return cls(lr=per_elem(lr), beta1=per_elem([s.beta1 for s in states]),
                   beta2=per_elem([s.beta2 for s in states]),
                   eps=per_elem([s.eps for s in states]),
                   wd=per_elem([s.weight_decay for s in states]),
                   step=per_elem([s.step for s in states]),
                   m=torch.cat([s.exp_avg.reshape(-1) for s in states]).double(),
                   v=torch.cat([s.exp_avg_sq.reshape(-1) for s in states]).double())

    def moments_finite(self) -> bool:
        return bool(torch.isfinite(self.m).all() and torch.isfinite(self.v).all())


@dataclass
class AdamWStep:
    """Everything δH₁ and the realized step need, float64 [P] unless noted."""

    d: torch.Tensor             # D = 1/(bc1·denom)
    w_grad: torch.Tensor        # lr(1−β1)D: weight of κȲ in Δθ
    w_momentum: torch.Tensor    # lr β1 D ⊙ m
    w_decay: torch.Tensor       # lr wd θ
    delta: torch.Tensor         # Δθ
    kappa: float                # clip factor
    grad_norm: float            # ‖Ȳ‖ (= ‖g‖ before clipping)


def clip_factor(grad_norm: float, max_grad_norm: float | None) -> float:
    """κ as torch.nn.utils.clip_grad_norm_ computes it."""
    if max_grad_norm is None:
        return 1.0
    return min(1.0, max_grad_norm / (grad_norm + CLIP_EPS))


def adamw_step(h: AdamWState, y_bar: torch.Tensor, theta: torch.Tensor,
               max_grad_norm: float | None) -> AdamWStep:
    """The step from Ȳ [P] and the current parameters θ [P] (float64)."""
    grad_norm = float(y_bar.norm())
    kappa = clip_factor(grad_norm, max_grad_norm)
    g = -kappa * y_bar
    t1 = h.step + 1
    v1 = h.beta2 * h.v + (1 - h.beta2) * g * g
    bc1 = 1 - h.beta1 ** t1
    bc2 = 1 - h.beta2 ** t1
    denom = v1.sqrt() / bc2.sqrt() + h.eps
    d = 1.0 / (bc1 * denom)
    w_grad = h.lr * (1 - h.beta1) * d
    w_momentum = h.lr * h.beta1 * d * h.m
    w_decay = h.lr * h.wd * theta
    delta = kappa * w_grad * y_bar - w_momentum - w_decay
    return AdamWStep(d=d, w_grad=w_grad, w_momentum=w_momentum, w_decay=w_decay, delta=delta,
                     kappa=kappa, grad_norm=grad_norm)
