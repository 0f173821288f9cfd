"""Which weighted sums of per-sequence gradients the backward accumulates, and how a unit's sums
become its summaries X_u (entropy) and Y_u (update) — issues 13 and 17.

Every per-sequence weight splits into a part known from the sequence itself at its own
gradient forward (S_g, T_g, m_g), or known before the pass (c^Y_g from rewards and lengths),
and scalars of its prompt (S̄_n, M_n, T̄_n) or of the batch (Ĥ_tok, Ê[T]) applied after the
unit. So no pass before the gradient pass is needed. The hooks backward (gradients.py) of
Σ_i S_i weights the per-sequence output-gradients by a [R, n] matrix and adds R weighted sums
of ∇S_i at once; with `full_vocabulary` a second backward, of Σ_i F_i, adds Σ ∇F_i.

Rows on ∇S (objective "logprob"), per prompt of the unit, in this order:
    ones      Σ_g ∇S_g
    baseline  Σ_g b_g ∇S_g       b = S (sampled) or m = (1/T)Σ_k Γ_k (full_vocabulary)
    length    Σ_g T_g ∇S_g       (token_mean only)
    then one row per `direct` weight known before the pass (c^Y → "update"; issue 15 adds
    δJ₁'s leave-one-out reward weight the same way)
Row on ∇F (objective "pathwise", full_vocabulary only): Σ_g ∇F_g, F = Σ_k h_k + Σ_k sg(Γ_k) log π_k.
Row on ∇E (objective "bonus", only with an entropy bonus, issue 15): Σ_g ∇E_g, E = Σ_k h_k, the
gradient through the logits only that TRL's entropy_coef adds to the step (no score term).

Per prompt n with G responses (b̄, B: mean and sum of b over the group; T̄ likewise):
    sampled:          X^seq_n = (Σ b∇S − b̄ Σ∇S)/(G−1)              = Σ_g (S_g − S̄_{−g})/G ∇S_g
    full_vocabulary:  X^seq_n = −(1/G)[Σ∇F − (B Σ∇S − Σ b∇S)/(G−1)]  (baseline β_{−g} = (B − b_g)/(G−1))
    length:           N_n = (Σ T∇S − T̄ Σ∇S)/(G−1)                    E[N_n] = ∇E[T | p_n]
    direct rows:      the row itself (Y_n = Σ c^Y ∇S)
and a unit is the weighted sum over its prompts (weight 1/k for a block of k). The batch step
(token_mean) X_u = (X^seq_u + Ĥ_tok N_u)/Ê[T] is entropy.EntropyScalars.entropy_vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from probe_core.entropy import SequenceStats
from probe_core.spec import EntropySpec

UPDATE = "update"             # the direct row whose unit sum is Y_u
REWARD = "reward"             # the direct row whose unit sum is Z_u (δJ₁, reward_side.py)
BONUS = "bonus"               # P_u = Σ_g ∇Σ_t h_t: the pathwise gradient of TRL's entropy bonus


@dataclass
class UnitSummary:
    """One unit's gradient summaries, fp32 [P] each, on the device.

    Fields: entropy X^seq_u (E = −∇H_seq,u); length N_u (E = ∇E[T]_u; token_mean only, else
    None); direct: the unit sums of the rows known before the pass, by name (UPDATE → Y_u).
    """

    entropy: torch.Tensor
    length: torch.Tensor | None
    direct: dict[str, torch.Tensor]
    bonus: torch.Tensor | None = None

    def vectors(self) -> dict[str, torch.Tensor]:
        """Every summary by name ("entropy", "length" when present, the direct rows, "bonus"
        when present)."""
        out = {"entropy": self.entropy}
        if self.length is not None:
            out["length"] = self.length
        out.update(self.direct)
        if self.bonus is not None:
            out[BONUS] = self.bonus
        return out


class SummaryPlan:
    """The accumulator rows of one job and their per-prompt combination.

    Args:
        spec: the entropy kind
        direct: per-sequence weights known before the pass, float64 [N] each, by name
            (at least UPDATE: c^Y with the unit weight *not* folded in)
        group_size: G
        bonus: also accumulate the entropy bonus's pathwise gradient P_u (one more backward)
    """

    def __init__(self, spec: EntropySpec, direct: dict[str, torch.Tensor], group_size: int,
                 bonus: bool = False):
        self.spec, self.direct, self.group_size = spec, direct, group_size
        self.token_mean = spec.normalization == "token_mean"
        self.pathwise = spec.estimator == "full_vocabulary"
        self.bonus = bonus
        self.rows = ["ones", "baseline"] + (["length"] if self.token_mean else []) + list(direct)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def logprob_weights(self, stats: SequenceStats, rows: torch.Tensor, prompt: torch.Tensor,
                        prompts: int) -> torch.Tensor:
        """The [prompts·K, n] weights of a chunk's ∇S_i: row j·K + r carries sequence i's weight
        r when i belongs to the unit's j-th prompt (`prompt` [n]), else 0.

        Args: stats: the chunk's SequenceStats (device); rows: its sequence indices [n]."""
        dev = stats.logprob.device
        known = [self.direct[name][rows].to(dev, torch.float32) for name in self.direct]
        per_seq = [torch.ones_like(stats.logprob), stats.baseline] \
            + ([stats.length] if self.token_mean else []) + known
        w = torch.stack(per_seq)                                            # [K, n]
        out = w.new_zeros(prompts, self.num_rows, w.shape[1])               # [k, K, n]
        out[prompt.to(dev), :, torch.arange(w.shape[1], device=dev)] = w.T
        return out.view(prompts * self.num_rows, -1)

    def combine(self, logprob_sums: torch.Tensor, pathwise_sums: torch.Tensor | None,
                stats: SequenceStats, prompt_weight: torch.Tensor,
                bonus_sums: torch.Tensor | None = None) -> UnitSummary:
        """One unit's summaries from its accumulated rows.

        Args: logprob_sums [k, K, P]; pathwise_sums [k, P] or None; stats: the unit's
        sequences, prompt by prompt [k·G]; prompt_weight [k] (device float32); bonus_sums
        [k, P] or None."""
        g, k = self.group_size, logprob_sums.shape[0]
        ones, base = logprob_sums[:, 0], logprob_sums[:, 1]                 # [k, P]
        b = stats.baseline.view(k, g)                                       # [k, G]
        w = prompt_weight[:, None]                                          # [k, 1]
        if self.pathwise:
            loo = (b.sum(1, keepdim=True) * ones - base) / (g - 1)          # Σ_g β_{−g}∇S_g
            entropy = -(pathwise_sums - loo) / g
        else:
            entropy = (base - b.mean(1, keepdim=True) * ones) / (g - 1)
        length = None
        if self.token_mean:
            t = stats.length.view(k, g)
            length = ((logprob_sums[:, 2] - t.mean(1, keepdim=True) * ones) / (g - 1) * w).sum(0)
        first_direct = self.num_rows - len(self.direct)
        direct = {name: (logprob_sums[:, first_direct + r] * w).sum(0)
                  for r, name in enumerate(self.direct)}
        bonus = None if bonus_sums is None else (bonus_sums * w).sum(0)
        return UnitSummary(entropy=(entropy * w).sum(0), length=length, direct=direct,
                           bonus=bonus)
