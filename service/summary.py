"""A short human summary of a ProbeResult (CLI `run`, `submit --wait`, and the demo)."""

from __future__ import annotations

import sys

from schemas import ProbeResult


def progress_line(phase: str, done: int, total: int) -> None:
    """One self-overwriting progress line on stderr."""
    count = f" {done}/{total}" if total else ""
    print(f"\r  {phase}{count}".ljust(40), end="", file=sys.stderr, flush=True)


def _pm(value: float, se: float | None) -> str:
    return f"{value:+.4e} ± {se:.1e}" if se is not None else f"{value:+.4e} (SE n/a)"


def _kind(r: ProbeResult) -> str:
    e = r.entropy
    if e is None:
        return "n/a"
    unit = "nats per token" if e.normalization == "token_mean" else "nats per response"
    return f"{e.normalization}, {e.estimator}, τ = {e.temperature:g} ({unit})"


def summarize(r: ProbeResult) -> str:
    d = r.delta_h1
    held_out = ""
    if r.entropy_batch is not None:
        e = r.entropy_batch
        held_out = (f"; held-out E batch {e.num_prompts} prompts × {e.responses_per_prompt}, "
                    f"mean {e.mean_response_tokens:.1f} tokens")
    lines = [
        f"batch        {r.batch.num_prompts} prompts × {r.batch.responses_per_prompt} responses, "
        f"mean {r.batch.mean_response_tokens:.1f} tokens, reward mean {r.batch.reward_mean:.3f}"
        + ("" if r.batch.on_policy_z is None else f", on-policy z {r.batch.on_policy_z:+.1f}")
        + held_out,
        f"optimizer    lr {r.optimizer.lr:.2e}, step {r.optimizer.step}, "
        f"grad norm {r.optimizer.grad_norm:.3e}",
        f"entropy      {_kind(r)}",
        f"δH₁ (pred.)  {_pm(d.total, d.se)}   [{d.mode}, {d.units} units, target "
        f"{d.target.replace('_', ' ')}]",
        f"  gradient {d.gradient_term:+.3e}  momentum {d.momentum_term:+.3e}  "
        f"weight decay {d.weight_decay_term:+.3e}",
    ]
    if r.realized is not None:
        z = r.realized
        k = f"{z.psis_k:.2f}" if z.psis_k is not None else "n/a"
        lines.append(f"ΔH (real)    {_pm(z.delta_h, z.se)}   H before {z.h_before:.4f}   "
                     f"[target {z.target.replace('_', ' ')}]")
        lines.append(f"  ESS fraction {z.ess_fraction:.3f}{'  (LOW)' if z.low_ess else ''}, "
                     f"PSIS k {k}")
    lines.append(f"memory       peak host RSS {r.memory.peak_host_rss_bytes / 2**20:.0f} MiB"
                 + (f", peak device {r.memory.peak_device_bytes / 2**20:.0f} MiB"
                    if r.memory.peak_device_bytes is not None else ""))
    t = r.timing
    lines.append(f"timing       total {t.total:.2f} s (load {t.load:.2f}, rollouts "
                 f"{t.rollouts:.2f}, teacher forcing {t.teacher_forcing:.2f}, gradients "
                 f"{t.gradients:.2f}, step {t.step:.2f}, realized {t.realized:.2f})")
    lines += [f"warning      {w}" for w in r.warnings]
    return "\n".join(lines)
