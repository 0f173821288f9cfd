"""The wire contract of entropy-probe (pydantic v2). No torch here: clients import it cheaply."""

from schemas.job import ErrorCode, JobError, JobList, JobStatus, ProbeJob, Progress
from schemas.request import ProbeRequest
from schemas.result import ProbeResult

__all__ = [
    "ErrorCode", "JobError", "JobList", "JobStatus", "ProbeJob", "Progress",
    "ProbeRequest", "ProbeResult",
]
