"""/probes: submit, poll, list, cancel and forget probe jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from schemas import JobList, JobStatus, ProbeJob, ProbeRequest
from service.admission import path_errors
from service.auth import require_token
from service.dependencies import get_settings, get_store, get_supervisor
from service.errors import error_response
from service.settings import Settings
from service.store import Conflict, IdempotencyConflict, JobStore, NotFound, QueueFull
from service.supervisor import Supervisor

router = APIRouter(prefix="/probes", tags=["probes"], dependencies=[Depends(require_token)],
                   responses={401: error_response("Missing or wrong bearer token")})

RETRY_AFTER_QUEUED_S = "2"
RETRY_AFTER_RUNNING_S = "1"
RETRY_AFTER_FULL_S = "10"
_400 = {400: error_response("The body is not parseable JSON")}
_404 = {404: error_response("No job with this id")}
_409 = {409: error_response("Conflict with the job's state or the Idempotency-Key")}
_SUBMIT = {413: error_response("Body too large (ENTROPY_PROBE_MAX_BODY_BYTES)"),
           415: error_response("The body is not JSON (Content-Type)"),
           422: error_response("Invalid request: field-level errors"),
           429: error_response("Queue full; see Retry-After")}


def _not_found(job_id: str) -> HTTPException:
    return HTTPException(404, f"no job with id {job_id[:100]!r}")


@router.post("", status_code=202, response_model=ProbeJob,
             responses={**_400, **_409, **_SUBMIT})
def submit(req: ProbeRequest, response: Response, store: JobStore = Depends(get_store),
           settings: Settings = Depends(get_settings),
           supervisor: Supervisor = Depends(get_supervisor),
           idempotency_key: str | None = Header(None, max_length=255)) -> ProbeJob:
    """Queue a probe job. A repeat with the same Idempotency-Key returns the first job."""
    errors = path_errors(req, settings.roots)
    if req.workers > supervisor.pool_size:
        errors.append({"type": "too_many_workers", "loc": ["body", "workers"],
                       "input": req.workers, "msg": f"workers={req.workers} but the server's "
                       f"pool holds {supervisor.pool_size} workers (ENTROPY_PROBE_DEVICES); "
                       f"ask for at most {supervisor.pool_size}"})
    if errors:
        if settings.backend == "ray":           # the workers may run on other hosts
            from service.ray_backend import SHARED_STORAGE_HINT
            for e in errors:
                if e["type"] == "checkpoint_not_found":
                    e["msg"] += f" on the server's host ({SHARED_STORAGE_HINT})"
        raise HTTPException(422, detail=errors)
    try:
        job, _ = store.create(req, idempotency_key, settings.max_queue)
    except IdempotencyConflict as exc:
        raise HTTPException(409, str(exc)) from None
    except QueueFull as exc:
        raise HTTPException(429, f"{exc}: retry later",
                            headers={"Retry-After": RETRY_AFTER_FULL_S}) from None
    response.headers["Location"] = f"/probes/{job.id}"
    return job


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")      # a misspelt filter is an error, not ignored

    status: JobStatus | None = None
    limit: int = Field(20, ge=1, le=100)
    after: str | None = Field(None, description="Id of the last job of the previous page.")


@router.get("", response_model=JobList, responses={**_404, 422: _SUBMIT[422]})
def list_jobs(query: Annotated[ListQuery, Query()],
              store: JobStore = Depends(get_store)) -> JobList:
    """Jobs, newest first."""
    try:
        data, has_more = store.list(query.status, query.limit, query.after)
    except NotFound:
        raise _not_found(query.after) from None
    return JobList(data=data, has_more=has_more)


@router.get("/{job_id}", response_model=ProbeJob, responses=_404)
def get_job(job_id: str, response: Response, store: JobStore = Depends(get_store)) -> ProbeJob:
    """The job; `Retry-After` says when to poll again while it is unfinished."""
    try:
        job = store.get(job_id)
    except NotFound:
        raise _not_found(job_id) from None
    if not job.status.finished:
        response.headers["Retry-After"] = (RETRY_AFTER_QUEUED_S if job.status == JobStatus.queued
                                           else RETRY_AFTER_RUNNING_S)
    return job


@router.post("/{job_id}/cancel", response_model=ProbeJob, responses={**_404, **_409})
def cancel(job_id: str, store: JobStore = Depends(get_store),
           supervisor: Supervisor = Depends(get_supervisor)) -> ProbeJob:
    """Queued → cancelled now; running → cancelling, then cancelled at the next chunk."""
    try:
        job = store.request_cancel(job_id)
    except NotFound:
        raise _not_found(job_id) from None
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    if job.status == JobStatus.cancelling:
        supervisor.cancel(job_id)
    return job


@router.delete("/{job_id}", status_code=204, response_class=Response,
               responses={**_404, **_409})
def delete(job_id: str, store: JobStore = Depends(get_store)) -> Response:
    """Forget a finished job and its result."""
    try:
        store.delete(job_id)
    except NotFound:
        raise _not_found(job_id) from None
    except Conflict as exc:
        raise HTTPException(409, str(exc)) from None
    return Response(status_code=204)
