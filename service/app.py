"""The FastAPI application: create_app(settings) wires store, worker supervisor and routers."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from service.metrics import Metrics
from service.middleware import REQUEST_ID, BodyLimit, RequestId
from service.routers import health, probes
from service.settings import Settings
from service.store import JobStore
from service.supervisor import Supervisor
from service.worker import WorkerConfig

log = logging.getLogger("entropy_probe.app")


def _version() -> str:
    try:
        return metadata.version("entropy-probe")
    except metadata.PackageNotFoundError:
        return "0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = JobStore(settings.state_dir)
        interrupted = store.load()
        if interrupted:
            log.warning("%d unfinished jobs from before the restart marked interrupted",
                        interrupted)
        cfg = WorkerConfig(settings.device, tuple(settings.roots), settings.trust_remote_code,
                           settings.host_budget_bytes, settings.fault_hook)
        app.state.store, app.state.metrics = store, Metrics()
        app.state.supervisor = Supervisor(store, cfg, app.state.metrics)
        app.state.supervisor.start()
        try:
            yield
        finally:
            app.state.supervisor.stop()

    app = FastAPI(title="entropy-probe", version=_version(), lifespan=lifespan,
                  description="Predicts and measures how one AdamW step of RL fine-tuning "
                  "changes a policy's entropy. See DESIGN.md, 'HTTP contract'.")
    app.state.settings = settings
    app.include_router(health.router)
    app.include_router(probes.router)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Outside every middleware: set the request id here, and never send a stack trace.
        rid = request.scope.get("state", {}).get("request_id", "")
        log.exception("unhandled error (request %s)", rid)
        return JSONResponse({"detail": "internal server error", "request_id": rid},
                            status_code=500, headers={REQUEST_ID: rid})

    # Added last = outermost: the request id exists before the body limit answers.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)
    return app
