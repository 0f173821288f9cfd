"""The job store: every job is one JSON file in the state directory, written atomically.

The store also holds the FIFO of queued jobs and the idempotency keys. After a restart,
finished jobs are served as before; a job that was queued or running when the server died is
marked failed with code `interrupted`, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from schemas import ErrorCode, JobError, JobStatus, ProbeJob, ProbeRequest, ProbeResult, Progress

log = logging.getLogger("entropy_probe.store")


class QueueFull(Exception):
    pass


class IdempotencyConflict(Exception):
    pass


class NotFound(Exception):
    pass


class Conflict(Exception):
    """The job is in a status that does not allow the operation (message says why)."""


def now() -> datetime:
    return datetime.now(timezone.utc)


def request_hash(req: ProbeRequest) -> str:
    """Hash of the validated request (defaults filled), so equal bodies hash equal."""
    return hashlib.sha256(req.model_dump_json().encode()).hexdigest()


@dataclass
class Record:
    seq: int                       # creation order: the list is newest first by seq
    job: ProbeJob
    request: str                   # ProbeRequest JSON, what the worker runs
    request_hash: str
    idempotency_key: str | None = None

    def to_json(self) -> str:
        return json.dumps({"seq": self.seq, "request_hash": self.request_hash,
                           "idempotency_key": self.idempotency_key,
                           "request": json.loads(self.request),
                           "job": self.job.model_dump(mode="json")})

    @classmethod
    def from_json(cls, text: str) -> Record:
        d = json.loads(text)
        if not (isinstance(d, dict) and isinstance(d.get("seq"), int)
                and isinstance(d.get("request_hash"), str)
                and isinstance(d.get("idempotency_key"), (str, type(None)))):
            raise ValueError("not a job record")
        return cls(d["seq"], ProbeJob.model_validate(d["job"]), json.dumps(d["request"]),
                   d["request_hash"], d.get("idempotency_key"))


class JobStore:
    """Thread-safe: the HTTP handlers and the supervisor thread share one instance."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs: dict[str, Record] = {}
        self._keys: dict[str, str] = {}        # idempotency key → job id
        self._queue: deque[str] = deque()
        self._seq = 0

    # -- persistence ---------------------------------------------------------------------------
    def _write(self, rec: Record) -> None:
        path = self.dir / f"{rec.job.id}.json"
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            f.write(rec.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self) -> int:
        """Read the state directory. Returns how many jobs were marked interrupted."""
        interrupted = 0
        with self._lock:
            for path in sorted(self.dir.glob("*.json")):
                try:
                    rec = Record.from_json(path.read_text())
                except (OSError, ValueError, KeyError) as exc:
                    # A damaged file must not stop the server: set it aside, say so, go on.
                    log.error("skipping unreadable job file %s (%s: %s); renamed to *.corrupt",
                              path.name, type(exc).__name__, str(exc)[:200])
                    try:
                        path.rename(path.with_suffix(".corrupt"))
                    except OSError:
                        pass
                    continue
                if not rec.job.status.finished:
                    self._fail(rec, ErrorCode.interrupted, "the server stopped before this job "
                               "finished; resubmit it", rec.job.progress.phase)
                    interrupted += 1
                self._jobs[rec.job.id] = rec
                if rec.idempotency_key:
                    self._keys[rec.idempotency_key] = rec.job.id
                self._seq = max(self._seq, rec.seq)
            for tmp in self.dir.glob("*.json.tmp"):
                tmp.unlink(missing_ok=True)
        return interrupted

    # -- submission ----------------------------------------------------------------------------
    def create(self, req: ProbeRequest, idempotency_key: str | None,
               max_queue: int) -> tuple[ProbeJob, bool]:
        """A new queued job, or (for a repeated idempotency key) the first one. Returns
        (job, created)."""
        digest = request_hash(req)
        with self._lock:
            if idempotency_key and idempotency_key in self._keys:
                rec = self._jobs[self._keys[idempotency_key]]
                if rec.request_hash != digest:
                    raise IdempotencyConflict(
                        "this Idempotency-Key was used with another request body")
                return rec.job.model_copy(deep=True), False
            if len(self._queue) >= max_queue:
                raise QueueFull(f"{len(self._queue)} jobs are queued (limit {max_queue})")
            self._seq += 1
            job = ProbeJob(id=uuid.uuid4().hex, status=JobStatus.queued, created_at=now())
            rec = Record(self._seq, job, req.model_dump_json(), digest, idempotency_key)
            self._write(rec)
            self._jobs[job.id] = rec
            if idempotency_key:
                self._keys[idempotency_key] = job.id
            self._queue.append(job.id)
            return job.model_copy(deep=True), True

    def take_next(self) -> tuple[str, str] | None:
        """Pop the oldest queued job and mark it running. Returns (id, request JSON)."""
        with self._lock:
            if not self._queue:
                return None
            rec = self._jobs[self._queue.popleft()]
            rec.job.status, rec.job.started_at = JobStatus.running, now()
            rec.job.progress = Progress(phase="starting")
            self._write(rec)
            return rec.job.id, rec.request

    # -- updates from the worker ---------------------------------------------------------------
    def progress(self, job_id: str, phase: str, done: int, total: int) -> None:
        # In memory only: a restart reports the job interrupted at its last persisted phase.
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec and not rec.job.status.finished:
                rec.job.progress = Progress(phase=phase, done=done, total=total)

    def succeed(self, job_id: str, result: ProbeResult) -> ProbeJob | None:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None or rec.job.status.finished:
                return None
            rec.job.status, rec.job.finished_at, rec.job.result = (
                JobStatus.succeeded, now(), result)
            rec.job.progress = Progress(phase="done", done=1, total=1)
            self._write(rec)
            return rec.job

    def fail(self, job_id: str, code: ErrorCode, message: str, phase: str | None = None,
             memory_trace: list[dict] | None = None) -> ProbeJob | None:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None or rec.job.status.finished:
                return None
            self._fail(rec, code, message, phase, memory_trace)
            return rec.job

    def _fail(self, rec: Record, code: ErrorCode, message: str, phase: str | None,
              memory_trace: list[dict] | None = None) -> None:
        rec.job.status = JobStatus.cancelled if code == ErrorCode.cancelled else JobStatus.failed
        rec.job.finished_at = now()
        rec.job.error = JobError(code=code, message=message, phase=phase,
                                 memory_trace=memory_trace)
        self._write(rec)

    # -- user operations -----------------------------------------------------------------------
    def get(self, job_id: str) -> ProbeJob:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise NotFound(job_id)
            return rec.job.model_copy(deep=True)

    def list(self, status: JobStatus | None, limit: int,
             after: str | None) -> tuple[list[ProbeJob], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        with self._lock:
            recs = sorted(self._jobs.values(), key=lambda r: r.seq, reverse=True)
            if after is not None:
                if after not in self._jobs:
                    raise NotFound(after)
                recs = [r for r in recs if r.seq < self._jobs[after].seq]
            if status is not None:
                recs = [r for r in recs if r.job.status == status]
            page = [r.job.model_copy(deep=True) for r in recs[:limit]]
            return page, len(recs) > limit

    def request_cancel(self, job_id: str) -> ProbeJob:
        """Queued → cancelled now; running → cancelling (the worker stops at the next chunk
        boundary); cancelling stays; finished → Conflict."""
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise NotFound(job_id)
            job = rec.job
            if job.status.finished:
                raise Conflict(f"the job already finished ({job.status.value})")
            if job.status == JobStatus.queued:
                self._queue.remove(job_id)
                self._fail(rec, ErrorCode.cancelled, "cancelled before it started", "queued")
            elif job.status == JobStatus.running:
                job.status = JobStatus.cancelling
                self._write(rec)
            return job.model_copy(deep=True)

    def delete(self, job_id: str) -> None:
        with self._lock:
            rec = self._jobs.get(job_id)
            if rec is None:
                raise NotFound(job_id)
            if not rec.job.status.finished:
                raise Conflict(f"the job is {rec.job.status.value}: cancel it first")
            del self._jobs[job_id]
            if rec.idempotency_key:
                self._keys.pop(rec.idempotency_key, None)
            (self.dir / f"{job_id}.json").unlink(missing_ok=True)

    def counts(self) -> dict[JobStatus, int]:
        with self._lock:
            out = {s: 0 for s in JobStatus}
            for rec in self._jobs.values():
                out[rec.job.status] += 1
            return out

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queue)
