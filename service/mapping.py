"""The one place where wire names (schemas) meet probe_core's dataclasses."""

from __future__ import annotations

import math
from importlib import metadata

from probe_core import spec as core
from probe_core.memory import TracePoint
from probe_core.outcome import BatchOutcome, ProbeOutcome
from probe_core.trainer_state import trainer_step
from schemas import ProbeRequest, ProbeResult
from schemas import request as asked
from schemas import result as wire


def to_spec(req: ProbeRequest, *, host_budget_bytes: int) -> core.ProbeSpec:
    """ProbeRequest → ProbeSpec."""
    rollouts = None
    if req.rollouts is not None:
        rollouts = [core.ClientRollout(r.prompt, list(r.responses), list(r.rewards))
                    for r in req.rollouts]
    return core.ProbeSpec(
        checkpoint=_checkpoint_spec(req.checkpoint),
        prompts=req.prompts, answers=req.answers, prompt_format=req.prompt_format,
        rollouts=rollouts, num_prompts=req.num_prompts,
        responses_per_prompt=req.group_size(),
        generation=_generation_spec(req.generation),
        reward_kind=req.reward.kind,
        objective=_objective_spec(req.objective),
        estimator=core.EstimatorSpec(mode=req.estimator.mode, block_size=req.estimator.block_size),
        entropy=core.EntropySpec(normalization=req.entropy.normalization,
                                 estimator=req.entropy.estimator),
        report=core.ReportSpec(per_prompt=req.report.per_prompt),
        lr_override=req.optimizer_overrides.lr,
        max_grad_norm=req.optimizer_overrides.max_grad_norm,
        realized=_realized_spec(req.realized),
        microbatch_size=req.memory.teacher_force_microbatch_size,
        trace_memory=req.memory.trace,
        host_budget_bytes=(req.memory.host_budget_bytes if req.memory.host_budget_bytes
                           is not None else host_budget_bytes),
        seed=req.seed, save_updated_adapter_to=req.save_updated_adapter_to,
        entropy_batch=None if req.entropy_batch is None else core.EntropyBatchSpec(
            prompts=list(req.entropy_batch.prompts),
            responses_per_prompt=req.entropy_batch.responses_per_prompt,
            num_prompts=req.entropy_batch.num_prompts))


def _checkpoint_spec(c: asked.CheckpointSpec) -> core.CheckpointSpec:
    return core.CheckpointSpec(base_model=c.base_model, adapter=c.adapter,
                               optimizer=c.optimizer, allow_full_model=c.allow_full_model)


def _generation_spec(g: asked.GenerationSpec) -> core.GenerationSpec:
    return core.GenerationSpec(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                               top_p=g.top_p, top_k=g.top_k, batch_size=g.batch_size)


def _objective_spec(o: asked.ObjectiveSpec) -> core.ObjectiveSpec:
    return core.ObjectiveSpec(advantage=o.advantage, length_norm=o.length_norm,
                              length_norm_constant=o.length_norm_constant,
                              advantage_eps=o.advantage_eps, entropy_coef=o.entropy_coef,
                              target_delta_h=o.target_delta_h)


def _realized_spec(r: asked.RealizedSpec) -> core.RealizedSpec:
    return core.RealizedSpec(enabled=r.enabled, normalization=r.normalization, psis=r.psis,
                             ess_threshold=r.ess_threshold,
                             lr_multipliers=list(r.lr_multipliers))


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or inf: undefined numbers become null."""
    return x if x is not None and math.isfinite(x) else None


def _num(x: float) -> float:
    """A required number; a non-finite value is clamped so the JSON stays valid."""
    if math.isfinite(x):
        return x
    return 0.0 if math.isnan(x) else math.copysign(1.7976931348623157e308, x)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def _reward(est, name: str) -> float | None:
    return None if est.reward is None else _finite(getattr(est.reward, name))


def _value_se(x) -> wire.ValueSE | None:
    if x is None or not math.isfinite(x.value):
        return None
    return wire.ValueSE(value=x.value, se=_finite(x.se))


def _delta_j1(out: ProbeOutcome) -> wire.DeltaJ1 | None:
    if out.reward is None:
        return None
    d = out.reward.delta_j1
    return wire.DeltaJ1(total=_num(d.total), se=_finite(d.se),
                        gradient_term=_num(d.gradient_term),
                        momentum_term=_num(d.momentum_term),
                        weight_decay_term=_num(d.weight_decay_term),
                        entropy_bonus_term=_num(d.entropy_bonus_term),
                        informative_units=d.informative_units, se_reliable=d.se_reliable)


def _realized(out: ProbeOutcome) -> wire.Realized | None:
    r = out.realized
    if r is None:
        return None
    total = out.delta_h1.total
    rows = [wire.RealizedRow(lr_multiplier=s, delta_h=_num(e.delta_h), se=_finite(e.se),
                             delta_h1=_num(s * total), ess_fraction=_num(e.ess_fraction),
                             psis_k=_finite(e.psis_k), delta_j=_reward(e, "delta_j"),
                             delta_j_se=_reward(e, "se"), curvature=_curvature(e))
            for s, e in r.by_multiplier]
    _, main = r.main
    return wire.Realized(
        delta_h=_num(main.delta_h), se=_finite(main.se), h_before=_num(r.h_before),
        h_before_se=_finite(r.h_before_se), h_after=_num(main.h_after), ess=_num(main.ess),
        ess_fraction=_num(main.ess_fraction), psis_k=_finite(main.psis_k),
        low_ess=not main.ess_fraction >= r.ess_threshold, normalization=r.normalization,
        delta_j=_reward(main, "delta_j"), delta_j_se=_reward(main, "se"),
        log_weight_noise_floor=_finite(r.noise_floor), by_lr_multiplier=rows,
        target=r.target)


def _curvature(est) -> wire.Curvature | None:
    c = est.curvature
    return None if c is None else wire.Curvature(value=_num(c.value), se=_finite(c.se))


def _entropy_batch(out: ProbeOutcome) -> wire.EntropyBatchSummary | None:
    e = out.entropy_batch
    return None if e is None else wire.EntropyBatchSummary(
        num_prompts=e.num_prompts, responses_per_prompt=e.responses_per_prompt,
        mean_response_tokens=_num(e.mean_response_tokens))


def _batch(b: BatchOutcome) -> wire.BatchSummary:
    return wire.BatchSummary(num_prompts=b.num_prompts,
                             responses_per_prompt=b.responses_per_prompt,
                             mean_response_tokens=_num(b.mean_response_tokens),
                             reward_mean=_num(b.reward_mean),
                             zero_advantage_prompts=b.zero_advantage_prompts,
                             on_policy_z=None if b.on_policy_z is None else _num(b.on_policy_z))


def _timing(seconds: dict[str, float]) -> wire.Timing:
    """Seconds per phase (probe_core keys them by its Phase names) and the total."""
    return wire.Timing(load=seconds["load"], rollouts=seconds["rollouts"],
                       teacher_forcing=seconds["teacher_forcing"],
                       gradients=seconds["gradients"], step=seconds["step"],
                       realized=seconds["realized"], total=seconds["total"])


def trace_points(trace: list[TracePoint]) -> list[wire.TracePoint]:
    """The memory trace on the wire (a result's, or a failed job's up to the failure)."""
    return [wire.TracePoint(phase=t.phase, t=t.t,
                            device_allocated_bytes=t.device_allocated_bytes,
                            device_peak_bytes=t.device_peak_bytes,
                            device_reserved_bytes=t.device_reserved_bytes,
                            host_rss_bytes=t.host_rss_bytes) for t in trace]


def _checkpoint(ck: core.CheckpointSpec | None) -> dict:
    """The result's checkpoint echo and TRL step (both null when the caller has no spec)."""
    if ck is None:
        return {}
    return {"checkpoint": wire.CheckpointEcho(base_model=ck.base_model, adapter=ck.adapter),
            "checkpoint_step": trainer_step(ck.adapter or ck.base_model)}


def to_result(out: ProbeOutcome, checkpoint: core.CheckpointSpec | None = None,
              workers: int = 1) -> ProbeResult:
    """ProbeOutcome → ProbeResult (validated by pydantic on construction; run_probe has
    already refused a δH₁ that is not a number, probe_core.probe.check_finite).
    `checkpoint` (the spec's) fills result.checkpoint and result.checkpoint_step; `workers`
    (how many shards ran the job) fills result.environment.workers."""
    d, u = out.delta_h1, out.delta_h1.u_statistic
    mem = out.memory
    return ProbeResult(
        delta_h1=wire.DeltaH1(
            total=_num(d.total), se=_finite(d.se), gradient_term=_num(d.gradient_term),
            momentum_term=_num(d.momentum_term), weight_decay_term=_num(d.weight_decay_term),
            mode=out.mode, units=out.units, target=d.target,
            se_unconditional=_finite(d.se_unconditional),
            u_statistic=None if u is None else wire.UStatistic(
                value=_num(u.value), bars_dot=_num(u.bars_dot), diag_sum=_num(u.diag_sum),
                se_plugin=_finite(u.se_plugin), zeta1_plugin=_finite(u.zeta1_plugin),
                se_jackknife=_finite(u.se_jackknife),
                zeta1_jackknife=_finite(u.zeta1_jackknife)),
            entropy_bonus_term=_num(out.reward.entropy_bonus_term) if out.reward else 0.0,
            entropy_coef_for_target=_value_se(out.reward.entropy_coef_for_target
                                              if out.reward else None)),
        delta_j1=_delta_j1(out),
        exchange_rate=_value_se(out.reward.exchange_rate if out.reward else None),
        entropy_batch=_entropy_batch(out),
        entropy=wire.EntropyKind(normalization=out.entropy.normalization,
                                 estimator=out.entropy.estimator,
                                 temperature=out.entropy.temperature),
        realized=_realized(out),
        batch=_batch(out.batch),
        proxies=wire.Proxies(cov_logp_advantage=_num(out.proxy.value),
                             cov_logp_advantage_se=_finite(out.proxy.se),
                             predicted_delta_h=_num(-out.proxy_lr * out.proxy.value)),
        optimizer=wire.OptimizerSummary(
            lr=out.optimizer.lr, betas=list(out.optimizer.betas), eps=out.optimizer.eps,
            weight_decay=out.optimizer.weight_decay, step=out.optimizer.step,
            grad_norm=_num(out.optimizer.grad_norm), clip_factor=_num(out.optimizer.clip_factor),
            param_groups=out.optimizer.param_groups),
        passes=wire.Passes(forward_no_grad=out.passes.forward_no_grad,
                           forward_grad=out.passes.forward_grad, backward=out.passes.backward,
                           noise_check_forward=out.passes.noise_check_forward),
        timing=_timing(out.timing),
        memory=wire.Memory(peak_device_bytes=mem.peak_device_bytes,
                           peak_host_rss_bytes=mem.peak_host_rss_bytes,
                           trace=trace_points(mem.trace)),
        environment=wire.Environment(device=out.device, torch=_version("torch"),
                                     transformers=_version("transformers"),
                                     peft=_version("peft"),
                                     entropy_probe=_version("entropy-probe"),
                                     workers=workers),
        updated_adapter=out.updated_adapter,
        warnings=out.warnings, per_prompt=_per_prompt(out), **_checkpoint(checkpoint))


def _per_prompt(out: ProbeOutcome) -> list[wire.PromptRow] | None:
    view = out.per_prompt
    if view is None:
        return None

    def at(values, n: int) -> float | None:
        return None if values is None else _finite(float(values[n]))

    return [wire.PromptRow(index=n, unit=int(view.unit[n]), h_before=at(view.h_before, n),
                           delta_h1=_num(float(view.delta_h1[n])), delta_h=at(view.delta_h, n))
            for n in range(len(view.unit))]
