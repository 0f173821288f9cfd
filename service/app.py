"""The FastAPI application: create_app(settings) wires store, worker supervisor and routers."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from service.dependencies import Services
from service.errors import validation_error
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestId
from service.routers import docs, health, probes, ui
from service import worker
from service.pool import Backend, local_backend, worker_devices
from service.settings import Settings, worker_config
from service.store import JobStore
from service.supervisor import Deadlines, Supervisor, WorkerMain

log = logging.getLogger("entropy_probe.app")


def _version() -> str:
    try:
        return metadata.version("entropy-probe")
    except metadata.PackageNotFoundError:
        return "0"


def backend(settings: Settings, worker_main: WorkerMain = worker.main) -> Backend:
    """The workers ENTROPY_PROBE_BACKEND and ENTROPY_PROBE_DEVICES ask for."""
    cfg = worker_config(settings)
    if settings.backend == "ray":
        from service import ray_backend
        return ray_backend.ray_backend(cfg, settings.devices, settings.device, worker_main,
                                       settings.ray_address)
    return local_backend(cfg, worker_devices(settings.devices, settings.device), worker_main)


def create_app(settings: Settings | None = None, worker_main: WorkerMain = worker.main
               ) -> FastAPI:
    """The app; `worker_main` is the worker processes' entry point (tests pass one that
    injects faults)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = JobStore(settings.state_dir)
        interrupted = store.load()
        if interrupted:
            log.warning("%d unfinished jobs from before the restart marked interrupted",
                        interrupted)
        metrics = Metrics()
        deadlines = Deadlines(settings.max_job_seconds, settings.deadline_grace_seconds)
        supervisor = Supervisor(store, backend(settings, worker_main), metrics, deadlines)
        app.state.services = Services(store, supervisor, metrics)
        supervisor.start()
        try:
            yield
        finally:
            supervisor.stop()
            store.close()

    # /docs and /redoc come from routers/docs.py (assets served locally, no CDN)
    app = FastAPI(title="entropy-probe", version=_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Predicts and measures how one AdamW step of RL fine-tuning "
                  "changes a policy's entropy. See DESIGN.md, 'HTTP contract'.")
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(probes.router)
    app.include_router(ui.router)
    app.include_router(docs.router)

    app.add_exception_handler(RequestValidationError, validation_error)
    # Added last = outermost: the request id exists before the body limit answers, and an
    # unexpected error becomes a 500 there (never a stack trace).
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)
    return app
