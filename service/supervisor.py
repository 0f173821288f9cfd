"""Server side of the workers: a pool of worker slots (one per ENTROPY_PROBE_DEVICES entry), the
queue's jobs handed to idle workers, their messages applied to the store, and a dead worker
replaced (the job it was running fails with `worker_crashed`, naming it; the others go on).

Scheduling: strict FIFO. The oldest queued job starts as soon as `workers` (its request's, 1 by
default) slots are idle, preferring those that already hold its base model (no reload); the jobs
behind it wait until it started, so a job over several workers is never starved. One thread runs
the loop; the HTTP handlers only read the slots and write cancel flags.

A job over k workers is a Run over k slots (rank order): each runs one shard (a Job with its
rank), their exchanges meet in the run's Hub (service/shard.py) and every shard gets the same
answer. Rank 0's JobDone is the job's result and rank 0's progress its progress. The first shard
that fails or dies fails the job with its error (a dead one: worker_crashed naming it); the
others get Abort and their cancel flag, and each slot frees when its own shard reports.

Deadlines: each shard carries the job's deadline to its worker, which stops at the next chunk
boundary (or exchange) past it. A worker still on the job `grace_s` later (a step with no
boundary: a huge load, a hung kernel) is killed and replaced; the job fails with
`deadline_exceeded` too. A shard told to stop (Abort) that has not reported `grace_s` later is
killed the same way.
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
from service.shard import SHM_HINT, ExchangeMismatch, Hub
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
    """A job in flight: the slots of its shards in rank order (one slot for `workers: 1`), the
    hub of their exchanges, and which shards have not reported yet. It stays here after its
    status is recorded (`ended_at`) until every shard reported or died: a slot frees when its
    own shard reports."""

    id: str
    slots: list[int]
    deadline_s: float | None
    started: float = field(default_factory=time.time)
    overdue: bool = False           # killed past its deadline's grace
    ended_at: float | None = None   # its status was recorded
    aborted: bool = False           # ended by a shard's failure: the others were told to stop
    phases: list[str] = field(init=False)       # each shard's phase, by rank
    pending: set[int] = field(init=False)       # slots whose shard has not reported
    killed: set[int] = field(init=False, default_factory=set)
    hub: Hub = field(init=False)

    def __post_init__(self) -> None:
        self.phases = ["starting"] * len(self.slots)
        self.pending = set(self.slots)
        self.hub = Hub(len(self.slots))

    @property
    def phase(self) -> str:
        return self.phases[0]

    def rank(self, slot: int) -> int:
        return self.slots.index(slot)

    def kill_at(self, grace_s: float) -> float | None:
        """When its unreported shards are killed: `grace_s` past the deadline, or past the abort
        (a shard that never reaches a chunk boundary or an exchange)."""
        due = [] if self.deadline_s is None else [self.started + self.deadline_s + grace_s]
        if self.aborted and self.ended_at is not None:
            due.append(self.ended_at + grace_s)
        return min(due, default=None)


class Supervisor:
    def __init__(self, store: JobStore, backend: Backend, metrics: Metrics,
                 deadlines: Deadlines = Deadlines()):
        self.store, self.metrics, self.deadlines = store, metrics, deadlines
        self.backend, self.spawn = backend, backend.spawn
        self.slots = [Slot(i, dev, c) for i, (dev, c) in enumerate(backend.slots)]
        self.runs: dict[str, Run] = {}
        self._head: tuple[str, ProbeRequest | None] = ("", None)   # the first queued, parsed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._lock = threading.RLock()      # the loop holds it for a whole step

    # -- public --------------------------------------------------------------------------------
    @property
    def pool_size(self) -> int:
        """How many workers the pool holds: the most a job can ask for (`workers`)."""
        return len(self.slots)

    def start(self) -> None:
        for slot in self.slots:
            slot.handle = self.spawn(slot.index, slot.cfg)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        with self._lock:
            for run in self.runs.values():      # stop at the next chunk boundary
                self._cancel_shards(run)
            for slot in self.slots:
                if slot.handle is not None:
                    slot.handle.stop()
                    slot.handle = None
            for run in self.runs.values():
                if run.ended_at is None:
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
        """Every shard of the job stops at its next chunk boundary (or exchange)."""
        with self._lock:
            run = self.runs.get(job_id)
            if run is not None:
                self._cancel_shards(run)

    def _cancel_shards(self, run: Run, abort: str | None = None, skip: int | None = None
                       ) -> None:
        """Flag every shard of the run that has not reported (but slot `skip`) to stop; with
        `abort`, also wake those waiting on an exchange."""
        for i in run.pending - {skip}:
            handle = self.slots[i].handle
            if handle is not None:
                handle.cancel(run.id)
                if abort is not None:
                    handle.send(w.Abort(run.id, abort))

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
        job_id = getattr(msg, "job_id", None)
        run = self.runs.get(job_id)
        if run is None or slot.job != job_id or slot.index not in run.pending:
            return                                  # a late message of a finished shard
        rank = run.rank(slot.index)
        if isinstance(msg, w.JobProgress):
            run.phases[rank] = msg.phase
            if rank == 0 and run.ended_at is None:  # the job's progress is rank 0's
                self.store.progress(msg.job_id, msg.phase, msg.done, msg.total)
        elif isinstance(msg, w.Exchange):
            self._exchange(run, slot, msg)
        elif isinstance(msg, (w.JobDone, w.JobFailed)):
            self._reported(run, slot, msg)

    def _exchange(self, run: Run, slot: Slot, msg: w.Exchange) -> None:
        """One shard's exchange; once all k made it, every shard gets the answer."""
        if run.ended_at is not None:
            return                                  # its shards were told to stop
        try:
            if msg.rank != run.rank(slot.index):
                raise ExchangeMismatch(f"{slot.name} is rank {run.rank(slot.index)} of the "
                                       f"job but sent an exchange as rank {msg.rank}")
            complete, answer = run.hub.add(msg)
        except ExchangeMismatch as exc:
            log.error("job %s: %s", run.id, exc)
            self.store.fail(run.id, ErrorCode.internal_error, "the shards of this job disagreed "
                            "on an exchange; the server log has details",
                            run.phases[run.rank(slot.index)])
            self._end(run, JobStatus.failed, abort=f"another shard failed: {exc}")
            return
        if not complete:
            return
        try:
            for i in run.slots:
                handle = self.slots[i].handle
                if handle is not None and i in run.pending:
                    handle.send(w.Exchanged(run.id, msg.seq, answer))
        except RuntimeError as exc:                 # /dev/shm full (service/shard.py)
            log.error("job %s: exchange %d not sent: %s", run.id, msg.seq, exc)
            self.store.fail(run.id, ErrorCode.out_of_memory, f"the server could not pass an "
                            f"exchange to the shards ({w.scrub(str(exc))}); {SHM_HINT}",
                            run.phases[0])
            self._end(run, JobStatus.failed, abort="the server could not pass an exchange")

    def _reported(self, run: Run, slot: Slot, msg: w.JobDone | w.JobFailed) -> None:
        """A shard ended: its slot frees; the job ends with rank 0's result or the first
        failure."""
        rank = run.rank(slot.index)
        try:
            if isinstance(msg, w.JobDone):
                self.metrics.base_used(slot.index, slot.device, msg.base_reused)
            if run.ended_at is None and (isinstance(msg, w.JobFailed) or rank == 0):
                # Whatever happens while recording it, the job is over.
                status = JobStatus.failed
                try:
                    status = self._record(slot, msg)
                finally:
                    abort = None
                    if isinstance(msg, w.JobFailed):
                        abort = f"{slot.name} (rank {rank}) failed: {msg.code}"
                    self._end(run, status, abort=abort, reported=slot)
        finally:
            slot.base_model = msg.base_model
            self._release(run, slot)

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
                                result.memory.peak_device_bytes)
        return JobStatus.succeeded

    def _end(self, run: Run, status: JobStatus, abort: str | None = None,
             reported: Slot | None = None) -> None:
        """The job's status is recorded; with `abort`, its shards still running (all but the
        one that `reported`) stop now."""
        first = self.slots[run.slots[0]]
        self.metrics.job_ended(first.index, first.device, status, time.time() - run.started)
        run.ended_at = time.time()
        if abort is None:
            return
        run.aborted = True
        self._cancel_shards(run, abort, skip=reported.index if reported else None)

    def _release(self, run: Run, slot: Slot) -> None:
        """`slot`'s shard of `run` is over: the slot takes the next job."""
        slot.job = None
        run.pending.discard(slot.index)
        if run.ended_at is not None and not run.pending:
            self.runs.pop(run.id, None)

    def _lost(self, slot: Slot) -> None:
        """The worker died: fail its job with the reason (the job's other shards stop), start a
        successor after a pause."""
        handle, name = slot.handle, slot.name
        reason = handle.exit_reason()
        log.error("%s died (%s)", name, reason)
        run = self.runs.get(slot.job) if slot.job else None
        if run is not None and run.ended_at is None:
            phase = run.phases[run.rank(slot.index)]
            if run.overdue:
                self.store.fail(run.id, ErrorCode.deadline_exceeded,
                                w.deadline_message(run.deadline_s, phase, killed=True), phase)
            else:
                self.store.fail(
                    run.id, ErrorCode.worker_crashed,
                    f"{name} died while running this job ({reason}); a new worker was started: "
                    "resubmit the job (SIGKILL often means the host ran out of memory)", phase)
            self._end(run, JobStatus.failed, abort=f"{name} died", reported=slot)
        if run is not None:
            self._release(run, slot)
        slot.handle, slot.ready, slot.job, slot.base_model = None, None, None, None
        slot.restart_at = time.time() + RESTART_DELAY_S
        handle.stop(timeout=0.5)

    # -- scheduling ----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Strict FIFO: the oldest queued job starts when `workers` slots are idle, preferring
        those that hold its base model; until then every job behind it waits too (a job over
        k workers is never starved by 1-worker jobs passing it)."""
        while True:
            idle = [s for s in self.slots if s.state == "idle"]
            if not idle:
                return
            nxt = self.store.take_next(
                lambda i, body, n=len(idle): self._workers_of(i, body) <= n)
            if nxt is None:
                return
            job_id, request_json = nxt
            req = self._head[1] if self._head[0] == job_id else None
            self._head = ("", None)
            try:
                req = req or ProbeRequest.model_validate_json(request_json)
            except ValueError as exc:           # the store holds validated requests only
                self.store.fail(job_id, ErrorCode.internal_error,
                                f"stored request unreadable: {str(exc)[:200]}", "queued")
                continue
            if req.workers > self.pool_size:    # queued under a server with a larger pool
                self.store.fail(job_id, ErrorCode.invalid_request,
                                f"this job asks for workers={req.workers} but the pool holds "
                                f"{self.pool_size} workers; resubmit it with workers <= "
                                f"{self.pool_size}", "queued")
                continue
            base = base_model_of(req)
            chosen = sorted(idle, key=lambda s: (s.base_model is None or s.base_model != base,
                                                 s.index))[:req.workers]
            run = Run(job_id, [s.index for s in chosen], self.deadlines.of(req.timeout_s))
            self.runs[job_id] = run
            for rank, slot in enumerate(chosen):
                slot.job = job_id
                slot.handle.cancel("")
                slot.handle.send(w.Job(job_id, request_json, deadline_s=run.deadline_s,
                                       rank=rank, size=len(chosen)))

    def _workers_of(self, job_id: str, request_json: str) -> int:
        """How many idle workers the queued job needs to start (its request parsed once while
        it waits first in line); 1 for one that cannot start at all (taken, then failed)."""
        if self._head[0] != job_id:
            try:
                self._head = (job_id, ProbeRequest.model_validate_json(request_json))
            except ValueError:
                self._head = (job_id, None)
        req = self._head[1]
        return 1 if req is None or req.workers > self.pool_size else req.workers

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for run in list(self.runs.values()):
            due = run.kill_at(self.deadlines.grace_s)
            if due is None or now <= due:
                continue
            for i in sorted(run.pending - run.killed):
                slot = self.slots[i]
                if slot.handle is None or slot.job != run.id:
                    continue
                run.killed.add(i)
                run.overdue = run.overdue or run.ended_at is None
                log.error("job %s: no chunk boundary %g s past its deadline or abort; killing "
                          "%s", run.id, self.deadlines.grace_s, slot.name)
                slot.handle.kill()
