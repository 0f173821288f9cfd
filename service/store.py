"""The job store: one SQLite database (standard library, WAL) in the state directory.

One row per job: its status and times in columns, its progress, error, request and result as JSON
text. Nothing is held in memory: a job, a page of the list or the queue head is read from the file
when asked for, through the `(status, seq)` index. Every state change is one transaction
(`synchronous=FULL`: a committed change survives a crash of the server or of the host; progress
updates skip the flush).

The HTTP handlers (a thread pool) and the supervisor thread share one instance: one connection,
used under one lock (`check_same_thread=False`), so its page cache is bounded and a check-then-
write (idempotency key, queue limit) is atomic.

After a restart, finished jobs are served as before; a job that was queued or running when the
server stopped is marked failed with code `interrupted`, never dropped silently. A first-round
state directory (`jobs/<id>.json`, one record per job) is imported once, when the database is
created; damaged files are set aside as `*.corrupt` and logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from schemas import ErrorCode, JobError, JobStatus, ProbeJob, ProbeRequest, ProbeResult, Progress
from schemas.result import CheckpointEcho, TracePoint

log = logging.getLogger("entropy_probe.store")

DB_NAME = "jobs.sqlite3"
FIRST_ROUND_DIR = "jobs"            # the first round's one-JSON-file-per-job layout
BUSY_TIMEOUT_MS = 30_000            # another process holding the file (a backup) is waited for
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,   -- creation order
    id              TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    finished_at     TEXT,
    progress        TEXT NOT NULL,                       -- Progress JSON
    error           TEXT,                                -- JobError JSON
    result          TEXT,                                -- ProbeResult JSON
    request         TEXT NOT NULL,                       -- ProbeRequest JSON, what the worker runs
    checkpoint      TEXT,                                -- CheckpointEcho JSON (of the request)
    request_hash    TEXT NOT NULL,
    idempotency_key TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_JOB = "id, status, created_at, started_at, finished_at, progress, error, result, checkpoint"
_UNFINISHED = "(" + ", ".join(f"'{s.value}'" for s in JobStatus if not s.finished) + ")"


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


def _job(row: tuple) -> ProbeJob:
    job_id, status, created, started, finished, progress, error, result, checkpoint = row
    return ProbeJob(id=job_id, status=JobStatus(status), created_at=created, started_at=started,
                    finished_at=finished, progress=Progress.model_validate_json(progress),
                    error=JobError.model_validate_json(error) if error else None,
                    result=ProbeResult.model_validate_json(result) if result else None,
                    checkpoint=CheckpointEcho.model_validate_json(checkpoint) if checkpoint
                    else None)


def _checkpoint_json(request: dict) -> str | None:
    """The paths a job probes (from its request JSON), kept beside the request so listings need
    not parse it; None where the request does not name them as strings."""
    ck = request.get("checkpoint") if isinstance(request, dict) else None
    paths = {k: ck.get(k) for k in ("base_model", "adapter")} if isinstance(ck, dict) else {}
    if not paths or not all(isinstance(v, (str, type(None))) for v in paths.values()):
        return None
    return CheckpointEcho(**paths).model_dump_json()


def _failure(code: ErrorCode, message: str, phase: str | None,
             memory_trace: list[TracePoint] | None = None) -> tuple[str, str, str]:
    """(status, finished_at, error JSON) of a job that ends with `code`."""
    status = JobStatus.cancelled if code == ErrorCode.cancelled else JobStatus.failed
    error = JobError(code=code, message=message, phase=phase, memory_trace=memory_trace)
    return status.value, now().isoformat(), error.model_dump_json()


INTERRUPTED_MESSAGE = "the server stopped before this job finished; resubmit it"


class JobStore:
    """Thread-safe: the HTTP handlers and the supervisor thread share one instance."""

    def __init__(self, state_dir: Path, durable: bool = True):
        """durable=False skips the fsync of each commit (bulk fills, benchmarks): a crash of
        the process still loses nothing committed, a crash of the host may lose the last
        commits; the file is never left damaged."""
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / DB_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._durable = durable
        self._synchronous = ""                  # what the connection is set to now
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "checkpoint" not in columns:         # a database from before the column existed
            self._db.execute("ALTER TABLE jobs ADD COLUMN checkpoint TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, sync: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before anything is read (BEGIN IMMEDIATE). `sync`: its
        commit waits for the disk (state changes); without, it survives a crash of the
        process but not of the host (progress), and is made durable by the next synced one."""
        mode = "FULL" if sync and self._durable else "NORMAL"
        with self._lock:
            if mode != self._synchronous:
                self._db.execute(f"PRAGMA synchronous={mode}")
                self._synchronous = mode
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- start-up ------------------------------------------------------------------------------
    def load(self) -> int:
        """Import a first-round state directory into a new database, and mark the jobs the last
        server left unfinished as interrupted. Returns how many were."""
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM meta WHERE key = 'created'").fetchone() is None:
                imported = self._import_first_round(db)
                db.execute("INSERT INTO meta VALUES ('created', ?)", (now().isoformat(),))
                if imported:
                    log.warning("imported %d jobs from the first-round state directory %s",
                                imported, self.dir / FIRST_ROUND_DIR)
            rows = db.execute(f"SELECT id, progress FROM jobs WHERE status IN {_UNFINISHED}"
                              ).fetchall()
            for job_id, progress in rows:
                phase = Progress.model_validate_json(progress).phase
                db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                           (*_failure(ErrorCode.interrupted, INTERRUPTED_MESSAGE, phase), job_id))
        return len(rows)

    def _import_first_round(self, db: sqlite3.Connection) -> int:
        """Copy `jobs/*.json` (records {seq, request_hash, idempotency_key, request, job}) into
        the new database, inside the caller's transaction. The files stay where they are."""
        folder = self.dir / FIRST_ROUND_DIR
        count = 0
        for path in sorted(folder.glob("*.json")):
            try:
                record = json.loads(path.read_text())
                if not (isinstance(record, dict) and isinstance(record.get("seq"), int)
                        and isinstance(record.get("request_hash"), str)
                        and isinstance(record.get("idempotency_key"), (str, type(None)))):
                    raise ValueError("not a job record")
                job = ProbeJob.model_validate(record["job"])
                checkpoint = _checkpoint_json(record["request"])
                request = json.dumps(record["request"])
            except (OSError, ValueError, KeyError) as exc:
                # A damaged file must not stop the server: set it aside, say so, go on.
                log.error("skipping unreadable job file %s (%s: %s); renamed to *.corrupt",
                          path.name, type(exc).__name__, str(exc)[:200])
                try:
                    path.rename(path.with_suffix(".corrupt"))
                except OSError:
                    pass
                continue
            db.execute(
                "INSERT INTO jobs (seq, id, status, created_at, started_at, finished_at, "
                "progress, error, result, request, request_hash, idempotency_key, checkpoint) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record["seq"], job.id, job.status.value, job.created_at.isoformat(),
                 job.started_at and job.started_at.isoformat(),
                 job.finished_at and job.finished_at.isoformat(), job.progress.model_dump_json(),
                 job.error and job.error.model_dump_json(),
                 job.result and job.result.model_dump_json(), request, record["request_hash"],
                 record["idempotency_key"], checkpoint))
            count += 1
        for tmp in folder.glob("*.json.tmp"):       # a write the first round did not finish
            tmp.unlink(missing_ok=True)
        return count

    # -- submission ----------------------------------------------------------------------------
    def create(self, req: ProbeRequest, idempotency_key: str | None,
               max_queue: int) -> tuple[ProbeJob, bool]:
        """A new queued job, or (for a repeated idempotency key) the first one. Returns
        (job, created)."""
        digest = request_hash(req)
        with self._transaction() as db:
            if idempotency_key:
                row = db.execute(f"SELECT request_hash, {_JOB} FROM jobs WHERE "
                                 "idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row[0] != digest:
                        raise IdempotencyConflict(
                            "this Idempotency-Key was used with another request body")
                    return _job(row[1:]), False
            queued = db.execute("SELECT count(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= max_queue:
                raise QueueFull(f"{queued} jobs are queued (limit {max_queue})")
            job = ProbeJob(id=uuid.uuid4().hex, status=JobStatus.queued, created_at=now())
            job.checkpoint = CheckpointEcho(base_model=req.checkpoint.base_model,
                                            adapter=req.checkpoint.adapter)
            db.execute("INSERT INTO jobs (id, status, created_at, progress, request, "
                       "request_hash, idempotency_key, checkpoint) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (job.id, job.status.value, job.created_at.isoformat(),
                        job.progress.model_dump_json(), req.model_dump_json(), digest,
                        idempotency_key, job.checkpoint.model_dump_json()))
            return job, True

    def take_next(self, fits: Callable[[str, str], bool] | None = None
                  ) -> tuple[str, str] | None:
        """Mark the oldest queued job running. Returns (id, request JSON). With `fits`
        (id, request JSON) → bool, the oldest job is taken only when it fits (None otherwise:
        it stays first in line)."""
        with self._transaction() as db:
            row = db.execute("SELECT id, request FROM jobs WHERE status = 'queued' "
                             "ORDER BY seq LIMIT 1").fetchone()
            if row is None or (fits is not None and not fits(row[0], row[1])):
                return None
            db.execute("UPDATE jobs SET status = 'running', started_at = ?, progress = ? "
                       "WHERE id = ?", (now().isoformat(),
                                        Progress(phase="starting").model_dump_json(), row[0]))
            return row[0], row[1]

    # -- updates from the worker ---------------------------------------------------------------
    def progress(self, job_id: str, phase: str, done: int, total: int) -> None:
        """Not a state change: frequent, and not worth a disk flush each."""
        with self._transaction(sync=False) as db:
            db.execute(f"UPDATE jobs SET progress = ? WHERE id = ? AND status IN {_UNFINISHED}",
                       (Progress(phase=phase, done=done, total=total).model_dump_json(), job_id))

    def succeed(self, job_id: str, result: ProbeResult) -> bool:
        """Record the result of an unfinished job. Returns whether it was recorded."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET status = 'succeeded', finished_at = ?, progress = ?, result = ? "
                f"WHERE id = ? AND status IN {_UNFINISHED}",
                (now().isoformat(), Progress(phase="done", done=1, total=1).model_dump_json(),
                 result.model_dump_json(), job_id))
            return cur.rowcount == 1

    def fail(self, job_id: str, code: ErrorCode, message: str, phase: str | None = None,
             memory_trace: list[TracePoint] | None = None) -> bool:
        """End an unfinished job with an error. Returns whether it was unfinished."""
        with self._transaction() as db:
            cur = db.execute(
                f"UPDATE jobs SET status = ?, finished_at = ?, error = ? "
                f"WHERE id = ? AND status IN {_UNFINISHED}",
                (*_failure(code, message, phase, memory_trace), job_id))
            return cur.rowcount == 1

    # -- user operations -----------------------------------------------------------------------
    def get(self, job_id: str) -> ProbeJob:
        rows = self._read(f"SELECT {_JOB} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(job_id)
        return _job(rows[0])

    def list(self, status: JobStatus | None, limit: int,
             after: str | None) -> tuple[list[ProbeJob], bool]:
        """Newest first; `after` is the id of the last job of the previous page."""
        where, args = [], []
        with self._lock:
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise NotFound(after)
                where.append("seq < ?")
                args.append(row[0])
            if status is not None:
                where.append("status = ?")
                args.append(status.value)
            sql = (f"SELECT {_JOB} FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} "
                   "ORDER BY seq DESC LIMIT ?")
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def request_cancel(self, job_id: str) -> ProbeJob:
        """Queued → cancelled now; running → cancelling (the worker stops at the next chunk
        boundary); cancelling stays; finished → Conflict."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(job_id)
            status = JobStatus(row[0])
            if status.finished:
                raise Conflict(f"the job already finished ({status.value})")
            if status == JobStatus.queued:
                db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                           (*_failure(ErrorCode.cancelled, "cancelled before it started",
                                      "queued"), job_id))
            elif status == JobStatus.running:
                db.execute("UPDATE jobs SET status = 'cancelling' WHERE id = ?", (job_id,))
            return _job(db.execute(f"SELECT {_JOB} FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(job_id)
            if not JobStatus(row[0]).finished:
                raise Conflict(f"the job is {row[0]}: cancel it first")
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def counts(self) -> dict[JobStatus, int]:
        out = {s: 0 for s in JobStatus}
        for status, n in self._read("SELECT status, count(*) FROM jobs GROUP BY status"):
            out[JobStatus(status)] = n
        return out

    def queue_length(self) -> int:
        return self._read("SELECT count(*) FROM jobs WHERE status = 'queued'")[0][0]
