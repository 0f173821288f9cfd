"""The device worker: a separate process that owns the device and a ModelCache, and runs one
job at a time. It never dies on a job's failure: a ProbeError (OOM included) or an unexpected
exception is reported and the worker takes the next job.

Protocol (picklable dataclasses over multiprocessing queues, or a Ray actor's send/poll):
  server → worker   Job | None (stop); during a sharded job also Exchanged, Abort
  worker → server   Ready, JobProgress, JobDone, JobFailed; during a sharded job also Exchange
A job over k workers (request `workers: k`) is k Jobs, one per rank, that run the same run_probe
(SPMD, probe_core/collective.py). Each shard's exchanges go to the server as Exchange messages;
the server answers each with Exchanged once all k ranks made it (service/shard.py). Rank 0's
JobDone carries the result; the others send an empty one. Abort (another shard failed or died)
makes a waiting shard fail at once so the worker takes the next job; cancel and the deadline are
checked while it waits too.
Cancel: the server writes the running job's id into a shared byte array; the worker polls it at
every chunk boundary (ProbeHooks.should_cancel). Deadline: Job.deadline_s, counted from when the
worker takes the job, checked at the same boundaries (ProbeHooks.deadline).

Tests inject faults through `wrap_hooks` (tests/faults.py); the production path has none.
"""

from __future__ import annotations

import gc
import logging
import os
import queue
import re
import time
from dataclasses import dataclass
from typing import Callable

from probe_core.spec import RuntimeOptions

PROGRESS_INTERVAL_S = 0.1
CANCEL_ID_BYTES = 64
IDLE_POLL_S = 1.0

log = logging.getLogger("entropy_probe.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """Built from Settings by service.settings.worker_config."""

    options: RuntimeOptions
    host_budget_bytes: int
    cpu_threads: int | None = None          # torch.set_num_threads; None: torch's choice
    cuda_visible_devices: str | None = None  # the worker's pin; None: as the server's
    remote: bool = False                    # may run on another host (Ray): paths may differ


@dataclass
class Job:
    id: str
    request_json: str
    deadline_s: float | None = None         # seconds from when the worker takes the job
    rank: int = 0                           # this shard of a job over `size` workers
    size: int = 1


@dataclass
class Exchange:
    """worker → server: shard `rank` makes its `seq`-th exchange (1, 2, …) of job `job_id`."""

    job_id: str
    rank: int
    seq: int
    op: str                                 # probe_core.collective.Op: gather | sum
    value: object                           # picklable; tensors for `sum`


@dataclass
class Exchanged:
    """server → worker: the answer of exchange `seq` (the same on every rank)."""

    job_id: str
    seq: int
    value: object


@dataclass
class Abort:
    """server → worker: stop shard `job_id` now (another shard failed or died)."""

    job_id: str
    reason: str


@dataclass
class Ready:
    pid: int
    device: str
    cpu_threads: int


@dataclass
class JobProgress:
    job_id: str
    phase: str
    done: int
    total: int


@dataclass
class JobDone:
    job_id: str
    result_json: str
    base_reused: bool
    base_model: str | None = None           # what the worker's model cache holds now


@dataclass
class JobFailed:
    job_id: str
    code: str
    message: str
    phase: str | None
    memory_trace: list | None = None        # [schemas.result.TracePoint] up to the failure
    base_model: str | None = None


_PATH = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\"]+")
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]")
MAX_MESSAGE_CHARS = 2000


def plain(message: str) -> str:
    """A message without terminal escapes or control characters (libraries colour theirs),
    bounded."""
    return _CONTROL.sub("", message)[:MAX_MESSAGE_CHARS]


def scrub(message: str) -> str:
    """First line of an unexpected error, host paths removed, bounded."""
    first = (plain(message).strip().splitlines() or [""])[0]
    return _PATH.sub("<path>", first)[:200]


# (hooks, request, the shard's rank) → the hooks a job runs with; tests wrap them to inject
# faults.
HooksWrapper = Callable[["ProbeHooks", "ProbeRequest", int], "ProbeHooks"]


def main(cfg: WorkerConfig, jobs, events, cancel_id, wrap_hooks: HooksWrapper | None = None
         ) -> None:
    """Entry point of the worker process (multiprocessing 'spawn')."""
    if cfg.cuda_visible_devices is not None:    # before anything initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.cuda_visible_devices
    import warnings

    import torch
    import transformers

    from probe_core.checkpoint import ModelCache
    from probe_core.probe import resolve_device
    from service import mapping  # noqa: F401 - imported before Ready, not inside a job's deadline

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)   # library deprecations, per job
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    parent = os.getppid()
    cache = ModelCache()
    events.put(Ready(os.getpid(), str(resolve_device(cfg.options.device)),
                     torch.get_num_threads()))
    while True:
        try:
            job = jobs.get(timeout=IDLE_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:      # the server died while we were idle
                return
            continue
        if job is None:
            return
        if not isinstance(job, Job):        # a late Exchanged/Abort of a shard that ended
            continue
        outcome = _run(job, cfg, cache, events, cancel_id, parent, wrap_hooks, jobs)
        outcome.base_model = cache.key[0] if cache.key else None
        events.put(outcome)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _trim_heap()


def _run(job: Job, cfg: WorkerConfig, cache, events, cancel_id, parent: int,
         wrap_hooks: HooksWrapper | None, jobs=None):
    from probe_core.errors import DeadlineExceeded, ProbeError
    from probe_core.probe import ProbeHooks, run_probe
    from schemas import ProbeRequest
    from service.mapping import to_result, to_spec, trace_points

    deadline = None if job.deadline_s is None else time.monotonic() + job.deadline_s
    last = {"phase": "load", "t": 0.0}

    def progress(phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if phase != last["phase"] or done == total or now - last["t"] >= PROGRESS_INTERVAL_S:
            events.put(JobProgress(job.id, phase, done, total))
            last["t"] = now
        last["phase"] = phase

    def should_cancel() -> bool:
        if os.getppid() != parent:          # the server died: stop, nobody wants the result
            raise SystemExit(0)
        return cancel_id.value == job.id.encode()

    try:
        req = ProbeRequest.model_validate_json(job.request_json)
        opts = cfg.options
        spec = to_spec(req, host_budget_bytes=cfg.host_budget_bytes)
        hooks = ProbeHooks(progress, should_cancel, deadline)
        collective = None
        if job.size > 1:                    # waits check the job's own hooks, not a fault's
            from service.shard import QueueCollective
            collective = QueueCollective(job, jobs, events, hooks)
        if wrap_hooks is not None:
            hooks = wrap_hooks(hooks, req, job.rank)
        outcome = run_probe(spec, opts, cache, hooks, collective)
        if job.rank > 0:                    # rank 0's outcome is the job's result
            return JobDone(job.id, "", outcome.base_reused)
        result = to_result(outcome, spec.checkpoint, workers=job.size)
        return JobDone(job.id, result.model_dump_json(), outcome.base_reused)
    except ProbeError as exc:
        message = (deadline_message(job.deadline_s, exc.phase, shards=job.size)
                   if isinstance(exc, DeadlineExceeded) else exc.message)
        if cfg.remote and exc.code == "checkpoint_not_found":
            from service.ray_backend import SHARED_STORAGE_HINT
            message += (f" (seen from the worker on host {os.uname().nodename}; "
                        f"{SHARED_STORAGE_HINT})")
        trace = trace_points(exc.trace) or None
        return JobFailed(job.id, exc.code, plain(message), exc.phase, trace)
    except Exception as exc:   # noqa: BLE001 - the worker must survive anything a job does
        log.exception("job %s failed unexpectedly", job.id)
        return JobFailed(job.id, "internal_error",
                         f"unexpected {type(exc).__name__}: {scrub(str(exc))}",
                         getattr(exc, "phase", None) or last["phase"])


def deadline_message(seconds: float | None, phase: str | None, killed: bool = False,
                     shards: int = 1) -> str:
    how = ("and reached no chunk boundary within the grace period: its worker was killed and "
           "replaced" if killed else "and stopped at the next chunk boundary" + (
               " (or while waiting on the job's other shards)" if shards > 1 else ""))
    return (f"the job ran past its deadline of {seconds:g} s during {phase} {how}; raise "
            "timeout_s (at most the server's ENTROPY_PROBE_MAX_JOB_SECONDS) or send a smaller "
            "batch")


def _trim_heap() -> None:
    """Give freed heap pages back to the OS so RSS stays flat across jobs (glibc only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
