"""Server side of the workers: a pool of worker slots (one per ENTROPY_PROBE_DEVICES entry), the
queue's jobs handed to idle workers, their messages applied to the store, and a dead worker
replaced (the job it was running fails with `worker_crashed`, naming it; the others go on).

Scheduling: the oldest queued job goes to an idle worker, preferring one that already holds its
base model (no reload). One thread runs the loop; the HTTP handlers only read the slots and
write cancel flags.

Deadlines: each job carries its deadline to the worker, which stops at the next chunk boundary
past it. A worker that is still on the job `grace_s` later (a step with no boundary: a huge
load, a hung kernel) is killed and replaced; the job fails with `deadline_exceeded` too.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from schemas import ErrorCode, JobStatus, ProbeRequest, ProbeResult
from service import worker as w
from service.metrics import Metrics
from service.pool import Backend, WorkerHandle, base_model_of
from service.store import JobStore

log = logging.getLogger("entropy_probe.supervisor")
POLL_S = 0.05
RESTART_DELAY_S = 1.0
WorkerMain = Callable[..., None]    # service.worker.main, or a test entry point that wraps it


@dataclass(frozen=True)
class Deadlines:
    max_job_s: float | None = None      # ENTROPY_PROBE_MAX_JOB_SECONDS: default and ceiling
    grace_s: float = 30.0

    def of(self, timeout_s: float | None) -> float | None:
        """The job's deadline in seconds: its timeout_s, at most the ceiling."""
        if timeout_s is None:
            return self.max_job_s
        return timeout_s if self.max_job_s is None else min(timeout_s, self.max_job_s)


@dataclass
class WorkerInfo:
    """One worker slot as /readyz and /metrics show it."""

    index: int
    device: str                     # the ENTROPY_PROBE_DEVICES entry
    state: str                      # starting | idle | busy | dead
    pid: int | None
    base_model: str | None          # the base model its cache holds
    cpu_threads: int | None


@dataclass
class Slot:
    index: int
    device: str
    cfg: w.WorkerConfig
    handle: WorkerHandle | None = None
    ready: w.Ready | None = None
    job: str | None = None
    base_model: str | None = None
    restart_at: float | None = None         # dead: when its successor starts

    @property
    def state(self) -> str:
        if self.handle is None:
            return "dead"
        if self.ready is None:
            return "starting"
        return "busy" if self.job is not None else "idle"

    @property
    def name(self) -> str:
        pid = self.ready.pid if self.ready else None
        return f"worker {self.index} ({self.device}, pid {pid})"


@dataclass
class Run:
    """A job in flight."""

    id: str
    slot: int
    deadline_s: float | None
    started: float = field(default_factory=time.time)
    phase: str = "starting"
    overdue: bool = False           # killed past its deadline's grace

    def past_grace(self, grace_s: float) -> bool:
        return (self.deadline_s is not None and not self.overdue
                and time.time() > self.started + self.deadline_s + grace_s)


class Supervisor:
    def __init__(self, store: JobStore, backend: Backend, metrics: Metrics,
                 deadlines: Deadlines = Deadlines()):
        self.store, self.metrics, self.deadlines = store, metrics, deadlines
        self.backend, self.spawn = backend, backend.spawn
        self.slots = [Slot(i, dev, c) for i, (dev, c) in enumerate(backend.slots)]
        self.runs: dict[str, Run] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._lock = threading.RLock()      # the loop holds it for a whole step

    # -- public --------------------------------------------------------------------------------
    def start(self) -> None:
        for slot in self.slots:
            slot.handle = self.spawn(slot.index, slot.cfg)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        with self._lock:
            for run in self.runs.values():      # stop at the next chunk boundary
                handle = self.slots[run.slot].handle
                if handle is not None:
                    handle.cancel(run.id)
            for slot in self.slots:
                if slot.handle is not None:
                    slot.handle.stop()
                    slot.handle = None
            for run in self.runs.values():
                self.store.fail(run.id, ErrorCode.interrupted, "the server shut down while "
                                "this job was running; resubmit it", run.phase)
            self.runs.clear()
        self.backend.close()

    def workers(self) -> list[WorkerInfo]:
        with self._lock:
            return [WorkerInfo(s.index, s.device, s.state, s.ready.pid if s.ready else None,
                               s.base_model, s.ready.cpu_threads if s.ready else None)
                    for s in self.slots]

    def cancel(self, job_id: str) -> None:
        with self._lock:
            run = self.runs.get(job_id)
            handle = self.slots[run.slot].handle if run else None
            if handle is not None:
                handle.cancel(job_id)

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._step():
                    self._stop.wait(POLL_S)
            except Exception:   # noqa: BLE001 - the supervisor must keep serving
                log.exception("supervisor step failed")
                self._stop.wait(POLL_S)

    def _step(self) -> bool:
        """One pass over the slots; whether any message arrived."""
        with self._lock:
            active = False
            for slot in self.slots:
                active |= self._service(slot)
            self._dispatch()
            self._enforce_deadlines()
            return active

    def _service(self, slot: Slot) -> bool:
        if slot.handle is None:
            if slot.restart_at is not None and time.time() >= slot.restart_at \
                    and not self._stop.is_set():
                slot.restart_at = None
                slot.handle = self.spawn(slot.index, slot.cfg)
                self.metrics.worker_restarted(slot.index, slot.device)
            return False
        try:
            messages = slot.handle.poll()
        except (EOFError, OSError):
            messages = None
        for msg in messages or []:
            self._handle(slot, msg)
        if messages is None or (not messages and not slot.handle.alive()):
            self._lost(slot)
        return bool(messages)

    def _handle(self, slot: Slot, msg) -> None:
        if isinstance(msg, w.Ready):
            slot.ready = msg
            log.info("%s ready", slot.name)
            return
        run = self.runs.get(getattr(msg, "job_id", None))
        if run is None or run.slot != slot.index:
            return                                  # a late message of a finished job
        if isinstance(msg, w.JobProgress):
            run.phase = msg.phase
            self.store.progress(msg.job_id, msg.phase, msg.done, msg.total)
        elif isinstance(msg, (w.JobDone, w.JobFailed)):
            # Whatever happens while recording it, the job is over: the next one must start.
            status = JobStatus.failed
            try:
                status = self._record(slot, msg)
            finally:
                slot.base_model = msg.base_model
                self._end(run, slot, status)

    def _record(self, slot: Slot, msg: w.JobDone | w.JobFailed) -> JobStatus:
        if isinstance(msg, w.JobFailed):
            code = ErrorCode(msg.code)
            self.store.fail(msg.job_id, code, msg.message, msg.phase, msg.memory_trace)
            return JobStatus.cancelled if code == ErrorCode.cancelled else JobStatus.failed
        try:
            result = ProbeResult.model_validate_json(msg.result_json)
        except ValueError as exc:
            log.error("job %s: unreadable result: %s", msg.job_id, exc)
            self.store.fail(msg.job_id, ErrorCode.internal_error, "the probe finished but its "
                            "result did not fit the result schema; the server log has details",
                            "done")
            return JobStatus.failed
        self.store.succeed(msg.job_id, result)
        self.metrics.job_memory(slot.index, slot.device, result.memory.peak_host_rss_bytes,
                                result.memory.peak_device_bytes, msg.base_reused)
        return JobStatus.succeeded

    def _end(self, run: Run, slot: Slot, status: JobStatus) -> None:
        self.metrics.job_ended(slot.index, slot.device, status, time.time() - run.started)
        self.runs.pop(run.id, None)
        slot.job = None

    def _lost(self, slot: Slot) -> None:
        """The worker died: fail its job with the reason, start a successor after a pause."""
        handle, name = slot.handle, slot.name
        reason = handle.exit_reason()
        log.error("%s died (%s)", name, reason)
        run = self.runs.get(slot.job) if slot.job else None
        if run is not None and run.overdue:
            self.store.fail(run.id, ErrorCode.deadline_exceeded,
                            w.deadline_message(run.deadline_s, run.phase, killed=True), run.phase)
            self._end(run, slot, JobStatus.failed)
        elif run is not None:
            self.store.fail(
                run.id, ErrorCode.worker_crashed,
                f"{name} died while running this job ({reason}); a new worker was started: "
                "resubmit the job (SIGKILL often means the host ran out of memory)", run.phase)
            self._end(run, slot, JobStatus.failed)
        slot.handle, slot.ready, slot.job, slot.base_model = None, None, None, None
        slot.restart_at = time.time() + RESTART_DELAY_S
        handle.stop(timeout=0.5)

    # -- scheduling ----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            idle = [s for s in self.slots if s.state == "idle"]
            if not idle:
                return
            nxt = self.store.take_next()
            if nxt is None:
                return
            job_id, request_json = nxt
            try:
                req = ProbeRequest.model_validate_json(request_json)
            except ValueError as exc:           # the store holds validated requests only
                self.store.fail(job_id, ErrorCode.internal_error,
                                f"stored request unreadable: {str(exc)[:200]}", "queued")
                continue
            base = base_model_of(req)
            slot = min(idle, key=lambda s: (s.base_model is None or s.base_model != base,
                                            s.index))
            run = Run(job_id, slot.index, self.deadlines.of(req.timeout_s))
            self.runs[job_id], slot.job = run, job_id
            slot.handle.cancel("")
            slot.handle.send(w.Job(job_id, request_json, deadline_s=run.deadline_s))

    def _enforce_deadlines(self) -> None:
        for run in self.runs.values():
            slot = self.slots[run.slot]
            if run.past_grace(self.deadlines.grace_s) and slot.handle is not None:
                run.overdue = True
                log.error("job %s: no chunk boundary %g s past its deadline; killing %s",
                          run.id, self.deadlines.grace_s, slot.name)
                slot.handle.kill()

