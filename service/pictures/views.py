"""JobView: what the pictures need of one job, from the service (ProbeJob) or a result file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError

from schemas import JobStatus, ProbeJob, ProbeResult
from schemas.result import CheckpointEcho, TracePoint

NO_RUN = "(checkpoint path unknown)"


@dataclass(frozen=True)
class JobView:
    id: str
    status: str
    result: ProbeResult | None = None
    created_at: datetime | None = None
    duration_s: float | None = None   # finished − started, else the probe's own total time
    error: str | None = None          # "[code] message (phase)" of a failed job
    progress: str | None = None       # of an unfinished job: "teacher_forcing 12/60"
    failure_trace: tuple[TracePoint, ...] = ()   # memory up to an OOM or a deadline
    checkpoint: CheckpointEcho | None = None     # the job's (the result has it too)

    @property
    def memory_trace(self) -> list[TracePoint]:
        return list(self.result.memory.trace) if self.result is not None else list(
            self.failure_trace)

    @property
    def adapter(self) -> str | None:
        ck = self.checkpoint or (self.result.checkpoint if self.result is not None else None)
        return (ck.adapter or ck.base_model) if ck is not None else None

    @property
    def run(self) -> str:
        """The run a checkpoint belongs to: the folder that holds it (a Trainer's output_dir
        holds its checkpoint-N folders)."""
        path = self.adapter
        return os.path.dirname(os.path.normpath(path)) if path else NO_RUN

    @classmethod
    def from_job(cls, job: ProbeJob) -> JobView:
        duration = None
        if job.started_at is not None and job.finished_at is not None:
            duration = (job.finished_at - job.started_at).total_seconds()
        elif job.result is not None:
            duration = job.result.timing.total
        error = None
        if job.error is not None:
            where = f" ({job.error.phase})" if job.error.phase else ""
            error = f"[{job.error.code.value}] {job.error.message}{where}"
        p = job.progress
        progress = None
        if job.status == JobStatus.running:
            progress = p.phase + (f" {p.done}/{p.total}" if p.total else "")
        trace = job.error.memory_trace if job.error is not None else None
        return cls(id=job.id, status=job.status.value, result=job.result,
                   created_at=job.created_at, duration_s=duration, error=error,
                   progress=progress, checkpoint=job.checkpoint,
                   failure_trace=tuple(TracePoint.model_validate(t) for t in trace or ()))

    @classmethod
    def from_file(cls, path: str | Path) -> JobView:
        """A ProbeResult (`entropy-probe run --output`) or a ProbeJob (`status`, GET /probes/ID)
        JSON file; a result's id is its file name."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from None
        try:
            if isinstance(data, dict) and "status" in data and "id" in data:
                return cls.from_job(ProbeJob.model_validate(data))
            result = ProbeResult.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the document"
            raise ValueError(f"{path}: neither a result nor a job ({exc.error_count()} errors; "
                             f"{where}: {first['msg']})") from None
        return cls(id=Path(path).stem, status="succeeded", result=result,
                   duration_s=result.timing.total)
