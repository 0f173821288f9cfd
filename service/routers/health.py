"""Liveness, readiness (the worker pool) and Prometheus metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from service.auth import require_token
from service.dependencies import Services, get_services, get_supervisor
from service.errors import error_response
from service.metrics import CONTENT_TYPE
from service.supervisor import Supervisor

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = "ok"


class WorkerState(BaseModel):
    device: str = Field(description="Its ENTROPY_PROBE_DEVICES entry.")
    pid: int | None = Field(description="Its process id (null while it starts or is dead).")
    state: Literal["starting", "idle", "busy", "dead"]
    base_model: str | None = Field(description="The base model it holds loaded, if any.")
    cpu_threads: int | None = Field(description="torch's intra-op threads in the worker.")


class Ready(BaseModel):
    workers: list[WorkerState]


class NotReady(Ready):
    detail: str


def _workers(supervisor: Supervisor) -> list[WorkerState]:
    return [WorkerState(device=w.device, pid=w.pid, state=w.state, base_model=w.base_model,
                        cpu_threads=w.cpu_threads) for w in supervisor.workers()]


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The HTTP process is alive (no token needed)."""
    return Health()


_401 = {401: error_response("Missing or wrong bearer token")}
# /metrics answers text, but its 401 is JSON like every other error (ErrorBody).
_401_JSON = {401: {"description": "Missing or wrong bearer token", "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}}


@router.get("/readyz", response_model=Ready, responses={503: {"model": NotReady}, **_401},
            dependencies=[Depends(require_token)])
def readyz(supervisor: Supervisor = Depends(get_supervisor)):
    """200 while at least one worker is ready (idle or busy), else 503; the list says which."""
    workers = _workers(supervisor)
    if not any(w.state in ("idle", "busy") for w in workers):
        body = NotReady(detail="no worker is ready yet", workers=workers)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "1"})
    return Ready(workers=workers)


@router.get("/metrics", response_class=PlainTextResponse, responses=_401_JSON,
            dependencies=[Depends(require_token)])
def metrics(services: Services = Depends(get_services)) -> Response:
    """Prometheus text format (prometheus_client)."""
    store = services.store
    text = services.metrics.render(store.counts(), store.queue_length(),
                                   services.supervisor.workers())
    return Response(text, media_type=CONTENT_TYPE)
