"""Server side of the worker: starts it, feeds it one job at a time, applies its messages to the
store, and replaces it when it dies (the job it was running fails with `worker_crashed`).

Deadlines: each job carries its deadline to the worker, which stops at the next chunk boundary
past it. A worker that is still on the job `deadline_grace_s` later (a step with no boundary: a
huge load, a hung kernel) is killed and replaced; the job fails with `deadline_exceeded` too.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

from schemas import ErrorCode, ProbeRequest, ProbeResult
from service import worker as w
from service.metrics import Metrics
from service.store import JobStore

log = logging.getLogger("entropy_probe.supervisor")
POLL_S = 0.1
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


def exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerProcess:
    """One worker process with its own queues (a killed process can leave a queue unusable)."""

    def __init__(self, cfg: w.WorkerConfig, target: WorkerMain = w.main):
        ctx = mp.get_context("spawn")
        self.jobs, self.events = ctx.Queue(), ctx.Queue()
        self.cancel_id = ctx.Array("c", w.CANCEL_ID_BYTES)
        self.process = ctx.Process(target=target, name="entropy-probe-worker", daemon=True,
                                   args=(cfg, self.jobs, self.events, self.cancel_id))
        self.process.start()
        self.ready: w.Ready | None = None
        self.stopped = False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process and release its queues; a second call does nothing (the server
        can stop while a dead worker waits to be replaced)."""
        if self.stopped:
            return
        self.stopped = True
        if self.process.is_alive():
            try:
                self.jobs.put(None)
            except (OSError, ValueError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        for q in (self.jobs, self.events):
            q.cancel_join_thread()
            q.close()
        # Drop the semaphores now, not at interpreter exit (the resource tracker warns).
        del self.jobs, self.events, self.cancel_id


class Supervisor:
    def __init__(self, store: JobStore, cfg: w.WorkerConfig, metrics: Metrics,
                 deadlines: Deadlines = Deadlines(), target: WorkerMain = w.main):
        self.store, self.cfg, self.metrics = store, cfg, metrics
        self.deadlines, self.target = deadlines, target
        self.worker: WorkerProcess | None = None
        self.current: str | None = None           # the job the worker is running
        self._phase: str | None = None
        self._started = 0.0
        self._deadline_s: float | None = None     # the current job's
        self._overdue: bool = False               # killed past its deadline's grace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._lock = threading.Lock()

    # -- public --------------------------------------------------------------------------------
    def start(self) -> None:
        self.worker = WorkerProcess(self.cfg, self.target)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        with self._lock:
            if self.worker is not None:
                if self.current is not None:     # stop at the next chunk boundary
                    self.worker.cancel_id.value = self.current.encode()
                self.worker.stop()
                self.worker = None
            if self.current is not None:
                self.store.fail(self.current, ErrorCode.interrupted, "the server shut down while "
                                "this job was running; resubmit it", self._phase)
                self.current = None

    def ready(self) -> w.Ready | None:
        wp = self.worker
        return wp.ready if wp is not None and wp.process.is_alive() else None

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if self.current == job_id and self.worker is not None:
                self.worker.cancel_id.value = job_id.encode()

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:   # noqa: BLE001 - the supervisor must keep serving
                log.exception("supervisor step failed")
                time.sleep(POLL_S)

    def _step(self) -> None:
        wp = self.worker
        with self._lock:
            if self.current is None and wp.ready is not None:
                nxt = self.store.take_next()
                if nxt is not None:
                    self.current, self._phase, self._started = nxt[0], "starting", time.time()
                    timeout = ProbeRequest.model_validate_json(nxt[1]).timeout_s
                    self._deadline_s = self.deadlines.of(timeout)
                    wp.cancel_id.value = b""
                    wp.jobs.put(w.Job(*nxt, deadline_s=self._deadline_s))
            elif self.current is not None and self._past_grace():
                self._overdue = True
                log.error("job %s: no chunk boundary %g s past its deadline; killing worker %s",
                          self.current, self.deadlines.grace_s, wp.process.pid)
                wp.process.kill()
        try:
            msg = wp.events.get(timeout=POLL_S)
        except queue.Empty:
            if not wp.process.is_alive():
                self._replace(wp)
            return
        except (EOFError, OSError):
            self._replace(wp)
            return
        self._handle(wp, msg)

    def _past_grace(self) -> bool:
        return (self._deadline_s is not None and not self._overdue and
                time.time() > self._started + self._deadline_s + self.deadlines.grace_s)

    def _handle(self, wp: WorkerProcess, msg) -> None:
        if isinstance(msg, w.Ready):
            wp.ready = msg
            log.info("worker %d ready on %s", msg.pid, msg.device)
        elif isinstance(msg, w.JobProgress):
            self._phase = msg.phase
            self.store.progress(msg.job_id, msg.phase, msg.done, msg.total)
        elif isinstance(msg, (w.JobDone, w.JobFailed)):
            # Whatever happens while recording it, the job is over: the next one must start.
            try:
                self._record(msg)
            finally:
                self._job_ended()

    def _record(self, msg: w.JobDone | w.JobFailed) -> None:
        if isinstance(msg, w.JobFailed):
            self.store.fail(msg.job_id, ErrorCode(msg.code), msg.message, msg.phase,
                            msg.memory_trace)
            return
        try:
            result = ProbeResult.model_validate_json(msg.result_json)
        except ValueError as exc:
            log.error("job %s: unreadable result: %s", msg.job_id, exc)
            self.store.fail(msg.job_id, ErrorCode.internal_error, "the probe finished but its "
                            "result did not fit the result schema; the server log has details",
                            "done")
            return
        self.store.succeed(msg.job_id, result)
        self.metrics.job_memory(result.memory.peak_host_rss_bytes,
                                result.memory.peak_device_bytes, msg.base_reused)

    def _job_ended(self) -> None:
        with self._lock:
            self.metrics.job_ran(time.time() - self._started)
            self.current = None

    def _replace(self, wp: WorkerProcess) -> None:
        """The worker died: fail its job with the reason, start a new one."""
        wp.process.join(1.0)
        reason = exit_reason(wp.process.exitcode)
        log.error("worker %s died (%s)", wp.process.pid, reason)
        with self._lock:
            if self.current is not None and self._overdue:
                self.store.fail(self.current, ErrorCode.deadline_exceeded,
                                w.deadline_message(self._deadline_s, self._phase, killed=True),
                                self._phase)
            elif self.current is not None:
                self.store.fail(
                    self.current, ErrorCode.worker_crashed,
                    f"the worker process died while running this job ({reason}); a new worker "
                    "was started: resubmit the job (SIGKILL often means the host ran out of "
                    "memory)", self._phase)
            if self.current is not None:
                self.metrics.job_ran(time.time() - self._started)
                self.current, self._overdue = None, False
        wp.stop(timeout=0.5)
        if self._stop.wait(RESTART_DELAY_S):
            return
        self.metrics.worker_restarts += 1
        self.worker = WorkerProcess(self.cfg, self.target)
