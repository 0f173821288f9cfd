"""GET /ui: the jobs and their plots in a browser. The page and its assets need no token (a plain
page load cannot send one); the page asks for it and sends it to ui/data as a Bearer header."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse

from schemas import JobStatus
from schemas.dashboard import Dashboard
from service.auth import require_token
from service.errors import error_response
from service.pictures import dashboard
from service.pictures.page import ASSETS, UI_CSP, ui_page
from service.pictures.views import JobView
from service.dependencies import get_store
from service.store import JobStore

router = APIRouter(tags=["ui"])

MAX_UI_JOBS = 200                 # the newest jobs the page shows
PAGE = 100                        # the store's page size (GET /probes's limit)


@router.get("/ui", response_class=HTMLResponse)
def ui() -> HTMLResponse:
    """The dashboard page (HTML)."""
    return HTMLResponse(ui_page(), headers={"Content-Security-Policy": UI_CSP})


@router.get("/ui/assets/{name}", response_class=FileResponse,
            responses={404: error_response("No such asset")})
def asset(name: str) -> FileResponse:
    """The page's script and style, and plotly.js from the installed plotly package."""
    if name not in ASSETS:
        raise HTTPException(404, f"no asset {name[:100]!r}")
    path, media_type = ASSETS[name]
    return FileResponse(path, media_type=media_type,
                        headers={"Cache-Control": "public, max-age=3600"})


def newest_jobs(store: JobStore, limit: int = MAX_UI_JOBS) -> list[JobView]:
    jobs, after = [], None
    while len(jobs) < limit:
        page, more = store.list(None, min(PAGE, limit - len(jobs)), after)
        jobs += page
        if not more or not page:
            break
        after = page[-1].id
    return [JobView.from_job(j if j.result is not None or j.status != JobStatus.succeeded
                             else store.get(j.id)) for j in jobs]


@router.get("/ui/data", response_model=Dashboard, dependencies=[Depends(require_token)],
            responses={401: error_response("Missing or wrong bearer token")})
def data(job: str | None = Query(None, max_length=200, description="Whose per-job plots to "
                                 "include (default: the newest job with a result)."),
         store: JobStore = Depends(get_store)) -> Dashboard:
    """The table and the figures the page draws (plotly figure JSON)."""
    return dashboard.build(newest_jobs(store), detail=job)
