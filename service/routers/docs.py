"""/docs (Swagger UI) and /redoc with their scripts and styles served from the installed
fastapi-offline package instead of a CDN: the API pages work on an air-gapped host. Their
Content-Security-Policy keeps the browser from fetching anything else from outside."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import (get_redoc_html, get_swagger_ui_html,
                                  get_swagger_ui_oauth2_redirect_html)
from fastapi.responses import FileResponse, HTMLResponse, Response

from service.pictures.page import DOCS_CSP

router = APIRouter(include_in_schema=False)

STATIC = Path(fastapi_offline.__file__).parent / "static"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


def _local_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def _url(request: Request, path: str) -> str:
    return request.scope.get("root_path", "").rstrip("/") + path


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    return _local_only(get_swagger_ui_html(
        openapi_url=_url(request, app.openapi_url), title=f"{app.title} · Swagger UI",
        swagger_js_url=_url(request, "/docs/assets/swagger-ui-bundle.js"),
        swagger_css_url=_url(request, "/docs/assets/swagger-ui.css"),
        swagger_favicon_url=_url(request, "/docs/assets/favicon.png"),
        oauth2_redirect_url=_url(request, OAUTH2_REDIRECT),
        # the validator badge would send the schema to an outside validator
        swagger_ui_parameters={"validatorUrl": None}))


@router.get(OAUTH2_REDIRECT, response_class=HTMLResponse)
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", response_class=HTMLResponse)
def redoc(request: Request) -> HTMLResponse:
    app = request.app
    return _local_only(get_redoc_html(
        openapi_url=_url(request, app.openapi_url), title=f"{app.title} · ReDoc",
        redoc_js_url=_url(request, "/docs/assets/redoc.standalone.js"),
        redoc_favicon_url=_url(request, "/docs/assets/favicon.png"), with_google_fonts=False))


@lru_cache(maxsize=1)
def _redoc_js() -> bytes:
    """ReDoc's bundle, its footer logo (an image on a CDN) replaced by an empty data URL: the
    image fails at once and ReDoc hides it, so the page asks nothing from outside."""
    return (STATIC / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO, b"data:,")


@router.get("/docs/assets/{name}", response_class=FileResponse)
def asset(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no asset {name[:100]!r}")
    cache = {"Cache-Control": "public, max-age=86400"}
    if name == "redoc.standalone.js":
        return Response(_redoc_js(), media_type=ASSETS[name], headers=cache)
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=cache)
