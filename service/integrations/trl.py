"""EntropyProbeCallback: probe every checkpoint a TRL / HF Trainer saves, without blocking it.

On each save the callback sends `<output_dir>/checkpoint-<step>` (a valid `checkpoint.adapter`
as it is) to a running entropy-probe service from a background thread. Finished results are
added to the trainer's logs as `entropy_probe/*` at the next log call, so they land in
`trainer.state.log_history` and in every tracker that logs after this callback; `attach(trainer)`
puts the callback first, so trackers from `report_to` see the values too. A probe that cannot be
submitted or fails is logged with `logging.warning` and skipped: training never stops for it.

    probe = EntropyProbeCallback("http://gpu-host:8000", {"prompts": P, "answers": A})
    trainer = GRPOTrainer(..., callbacks=[probe])     # or: probe.attach(trainer)
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Union

from transformers import TrainerCallback

from schemas import ProbeRequest, ProbeResult

log = logging.getLogger(__name__)

RequestBody = Union[ProbeRequest, dict]
# A fixed request body (without `checkpoint`), or a function of the saved step that builds one,
# e.g. from the training loop's own rollouts: {"rollouts": [...], "reward": {"kind": "provided"}}.
RequestSource = Union[RequestBody, Callable[[int], RequestBody]]

PREFIX = "entropy_probe/"

# TRL's loss_type → the probe's length norm (README, "TRL and verl losses as probe objectives")
LENGTH_NORMS = {"dapo": "token_mean", "bnpo": "token_mean", "grpo": "per_sequence",
                "dr_grpo": "constant"}
ADVANTAGES = {"group": "standardized", "batch": "batch_standardized", "none": "mean_centered",
              True: "standardized", False: "mean_centered"}
TRL_STD_EPS = 1e-4            # grpo_trainer: advantages / (std_rewards + 1e-4)


@dataclass
class _Done:
    step: int                       # global step of the probed checkpoint
    result: ProbeResult

    def metrics(self) -> dict[str, float]:
        r = self.result
        out = {f"{PREFIX}checkpoint_step": float(self.step),
               f"{PREFIX}delta_h1": r.delta_h1.total}
        if r.delta_h1.se is not None:
            out[f"{PREFIX}delta_h1_se"] = r.delta_h1.se
        if r.delta_j1 is not None:
            out[f"{PREFIX}delta_j1"] = r.delta_j1.total
            if r.delta_j1.se is not None:
                out[f"{PREFIX}delta_j1_se"] = r.delta_j1.se
        if r.exchange_rate is not None:
            out[f"{PREFIX}exchange_rate"] = r.exchange_rate.value
        if r.realized is not None:
            out[f"{PREFIX}delta_h"] = r.realized.delta_h
            if r.realized.se is not None:
                out[f"{PREFIX}delta_h_se"] = r.realized.se
            out[f"{PREFIX}ess_fraction"] = r.realized.ess_fraction
            if r.entropy is not None and r.entropy.normalization == "token_mean":
                # the checkpoint's token-mean entropy, beside TRL's own `entropy`
                out[f"{PREFIX}entropy"] = r.realized.h_before
        return out


class EntropyProbeCallback(TrainerCallback):
    """Args:
        base_url: the entropy-probe service, e.g. "http://gpu-host:8000".
        request: the probe request without `checkpoint` (prompts/answers, responses_per_prompt,
            generation, ...), or a callable step -> request called on the trainer's thread at
            each save.
        base_model: the base model directory as the service sees it. Default: the adapter
            config's base_model_name_or_path (the path the trainer loaded, when it is local).
        token: bearer token when the service has ENTROPY_PROBE_API_TOKEN set.
        every_n_saves: probe one save in n.
        map_path: turns a local checkpoint path into the path the service sees (when the
            service mounts the run directory elsewhere, e.g. under /checkpoints).
        probe_timeout: seconds to wait for one probe before giving up on it.
        wait_at_end: in on_train_end, wait up to end_timeout seconds for outstanding probes and
            log their results (as one more log entry per result).
        match_trainer: fill the request's objective (from loss_type, scale_rewards and
            entropy_coef),
            generation temperature and max_new_tokens (max_completion_length) and
            optimizer_overrides.max_grad_norm from the trainer's args, so the probed step is
            the trainer's; what the request sets itself wins.
    """

    def __init__(self, base_url: str, request: RequestSource, *, base_model: str | None = None,
                 token: str | None = None, every_n_saves: int = 1,
                 map_path: Callable[[str], str] | None = None, probe_timeout: float = 3600.0,
                 wait_at_end: bool = False, end_timeout: float = 600.0, poll: float = 0.5,
                 match_trainer: bool = True, entropy_prompts: list[str] | None = None):
        if not callable(request):
            _body(request, "checkpoint-0", base_model)   # a bad template fails here, not later
        self.base_url, self.request, self.base_model, self.token = (base_url, request,
                                                                     base_model, token)
        self.every_n_saves = max(1, every_n_saves)
        self.map_path = map_path or (lambda p: p)
        self.probe_timeout, self.poll = probe_timeout, poll
        self.wait_at_end, self.end_timeout = wait_at_end, end_timeout
        self.match_trainer = match_trainer
        # held-out prompts: two-batch mode, δH₁ and ΔH measured on them (README)
        self.held_out = ({"entropy_batch": {"prompts": list(entropy_prompts)}}
                         if entropy_prompts else {})
        self._run_id = uuid.uuid4().hex[:12]
        self._saves = 0
        self._todo: queue.Queue[tuple[int, dict] | None] = queue.Queue()
        self._done: queue.Queue[_Done] = queue.Queue()
        self._outstanding = 0                 # submitted to the thread, not yet finished
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._trainer = None
        self._flushing = False                # on_train_end is logging results itself

    # -- wiring --------------------------------------------------------------------------------
    def attach(self, trainer) -> EntropyProbeCallback:
        """Register as the trainer's first callback: trackers (report_to) log in their own
        on_log, after the callbacks before them, so this one must come first for them to see
        the entropy_probe/* values. Also lets on_train_end log late results through
        trainer.log."""
        trainer.callback_handler.callbacks[:] = [
            c for c in trainer.callback_handler.callbacks if c is not self]
        trainer.callback_handler.callbacks.insert(0, self)
        self._trainer = trainer
        return self

    # -- trainer events ------------------------------------------------------------------------
    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._saves += 1
        if (self._saves - 1) % self.every_n_saves:
            return
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(ckpt):
            log.warning("entropy-probe: %s was not written; probe skipped", ckpt)
            return
        try:
            template = self.request(state.global_step) if callable(self.request) else self.request
            body = _body(template, self.map_path(os.path.abspath(ckpt)), self.base_model,
                         {**(trainer_fields(args, applied_entropy_coef(self._trainer, args))
                             if self.match_trainer else {}), **self.held_out})
        except Exception as exc:  # a user callable or template error must not stop training
            log.warning("entropy-probe: could not build the request for step %d: %s",
                        state.global_step, exc)
            return
        with self._lock:
            self._outstanding += 1
        self._ensure_thread()
        self._todo.put((state.global_step, body))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # One result per log call, so a tracker sees each as its own point.
        if logs is None or self._flushing or self._done.empty():
            return
        values = self._done.get_nowait().metrics()
        logs.update(values)
        # Trainer.log appended a copy of `logs` to log_history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs):
        if self.wait_at_end:
            deadline = time.monotonic() + self.end_timeout
            while self.outstanding and time.monotonic() < deadline:
                time.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))
            if self.outstanding:
                log.warning("entropy-probe: %d probe(s) still running after %.0f s; not "
                            "waiting for them", self.outstanding, self.end_timeout)
        self._flushing = True                 # trainer.log calls our on_log too
        try:
            while not self._done.empty():
                values = self._done.get_nowait().metrics()
                if self._trainer is not None:
                    self._trainer.log(values)    # through every tracker's on_log
                else:
                    state.log_history.append({**values, "step": state.global_step})
        finally:
            self._flushing = False

    @property
    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    # -- background thread ---------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # Daemon: a script that ends while a probe runs exits instead of hanging on it.
            self._thread = threading.Thread(target=self._serve, name="entropy-probe-callback",
                                            daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        client = None
        while True:
            step, body = self._todo.get()
            try:
                if client is None:
                    from service.client import ProbeClient
                    client = ProbeClient(self.base_url, token=self.token)
                job_id = client.submit(body, idempotency_key=f"trl-{self._run_id}-{step}")
                result = client.wait(job_id, timeout=self.probe_timeout, poll=self.poll)
                self._done.put(_Done(step, result))
            except Exception as exc:  # connection refused, job failed, timeout: skip this one
                log.warning("entropy-probe: probe of checkpoint-%d skipped: %s: %s", step,
                            type(exc).__name__, str(exc)[:300])
            finally:
                with self._lock:
                    self._outstanding -= 1


def applied_entropy_coef(trainer, args) -> float | None:
    """The entropy_coef TRL's next step applies: under use_adaptive_entropy the trainer's
    current coefficient, gated to 0 while the last window's entropy is above entropy_target
    (grpo_trainer._compute_loss); None without an attached trainer (then args.entropy_coef)."""
    if trainer is None or not hasattr(trainer, "entropy_coef"):
        return None
    if getattr(args, "use_adaptive_entropy", False):
        last = getattr(trainer, "_last_world_entropy", None)
        if last is not None and last > args.entropy_target:
            return 0.0
    return float(trainer.entropy_coef)


def trainer_fields(args, entropy_coef: float | None = None) -> dict:
    """The request sections that make the probed step the trainer's own: the objective of its
    loss_type and scale_rewards (and its entropy bonus: `entropy_coef`, the trainer's current
    one under adaptive control, else args.entropy_coef), its sampling temperature and
    completion length, its gradient clipping. Arguments it does not have (a plain Trainer) or
    loss types the probe does not reproduce are left out (logged)."""
    objective, generation, overrides = {}, {}, {}
    loss_type = getattr(args, "loss_type", None)
    if loss_type in LENGTH_NORMS:
        objective["length_norm"] = LENGTH_NORMS[loss_type]
        if loss_type == "dr_grpo":
            objective["length_norm_constant"] = float(args.max_completion_length)
    elif loss_type is not None:
        log.warning("entropy-probe: loss_type=%r has no probe objective (its per-token weights "
                    "differ); the request's objective is used as it is", loss_type)
    scale = getattr(args, "scale_rewards", None)
    if scale in ADVANTAGES:
        objective["advantage"] = ADVANTAGES[scale]
        if ADVANTAGES[scale] != "mean_centered":
            objective["advantage_eps"] = TRL_STD_EPS
    coef = entropy_coef if entropy_coef is not None else getattr(args, "entropy_coef", None)
    if coef:
        objective["entropy_coef"] = float(coef)
    if getattr(args, "temperature", None) is not None:
        generation["temperature"] = float(args.temperature)
    if getattr(args, "max_completion_length", None):
        generation["max_new_tokens"] = int(args.max_completion_length)
    if getattr(args, "max_grad_norm", None):          # 0 or None: the Trainer does not clip
        overrides["max_grad_norm"] = float(args.max_grad_norm)
    fields = {"objective": objective, "generation": generation, "optimizer_overrides": overrides}
    return {k: v for k, v in fields.items() if v}


def _body(template: RequestBody, adapter: str, base_model: str | None,
          trainer: dict | None = None) -> dict:
    """The request for one checkpoint: the template with `checkpoint` set (validated). The
    `trainer` sections (trainer_fields) fill what the template does not set itself."""
    body = (template.model_dump(exclude_unset=True) if isinstance(template, ProbeRequest)
            else dict(template))
    for section, values in (trainer or {}).items():
        body[section] = {**values, **(body.get(section) or {})}
    ckpt = dict(body.get("checkpoint") or {})
    ckpt.update(adapter=adapter, optimizer=None)
    if base_model is not None:
        ckpt["base_model"] = base_model
    body["checkpoint"] = ckpt
    return ProbeRequest.model_validate(body).model_dump(mode="json")
