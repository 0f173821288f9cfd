"""ProbeJob: the state of one job as GET /probes/{id} returns it."""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from pydantic import BaseModel, Field

from schemas.result import CheckpointEcho, ProbeResult, TracePoint


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class ErrorCode(str, Enum):
    """Error codes are part of the contract; the README lists what each means."""

    invalid_request = "invalid_request"
    checkpoint_not_found = "checkpoint_not_found"
    checkpoint_invalid = "checkpoint_invalid"
    adapter_base_mismatch = "adapter_base_mismatch"
    optimizer_state_missing = "optimizer_state_missing"
    optimizer_state_mismatch = "optimizer_state_mismatch"
    unsupported_optimizer = "unsupported_optimizer"
    unsafe_checkpoint = "unsafe_checkpoint"
    too_many_trainable_params = "too_many_trainable_params"
    tokenizer_error = "tokenizer_error"
    degenerate_batch = "degenerate_batch"
    out_of_memory = "out_of_memory"
    worker_crashed = "worker_crashed"
    deadline_exceeded = "deadline_exceeded"
    interrupted = "interrupted"
    cancelled = "cancelled"
    internal_error = "internal_error"


class JobError(BaseModel):
    code: ErrorCode
    message: str
    phase: str | None = None
    memory_trace: list[TracePoint] | None = Field(
        None, description="The memory trace up to the failure (out_of_memory, "
        "deadline_exceeded).")


class Progress(BaseModel):
    phase: str = "queued"
    done: int = 0
    total: int = 0


class ProbeJob(BaseModel):
    id: str
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Field(default_factory=Progress)
    error: JobError | None = None
    result: ProbeResult | None = None
    checkpoint: CheckpointEcho | None = Field(
        None, description="The checkpoint paths the request names (also while queued, "
        "running or after a failure).")


class JobList(BaseModel):
    data: list[ProbeJob]
    has_more: bool
