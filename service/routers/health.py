"""Liveness, readiness (the device worker) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from service.auth import require_token
from service.dependencies import Services, get_services, get_supervisor
from service.errors import error_response
from service.supervisor import Supervisor

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = "ok"


class Ready(BaseModel):
    device: str
    worker_pid: int
    cpu_threads: int = Field(description="torch's intra-op threads in the worker.")


class NotReady(BaseModel):
    detail: str


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
    """200 with the device and worker pid when the device worker is up, else 503."""
    ready = supervisor.ready()
    if ready is None:
        return JSONResponse(NotReady(detail="the device worker is starting").model_dump(),
                            status_code=503, headers={"Retry-After": "1"})
    return Ready(device=ready.device, worker_pid=ready.pid, cpu_threads=ready.cpu_threads)


@router.get("/metrics", response_class=PlainTextResponse, responses=_401_JSON,
            dependencies=[Depends(require_token)])
def metrics(services: Services = Depends(get_services)) -> PlainTextResponse:
    """Prometheus text format."""
    store = services.store
    text = services.metrics.render(store.counts(), store.queue_length(),
                                   services.supervisor.ready() is not None)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
