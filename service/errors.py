"""Bodies of the HTTP errors the service sends for bad requests: a 415 for a body that is not
JSON, and 422 validation errors made safe to echo (bounded, valid UTF-8, no exception objects).
"""

from __future__ import annotations

import email.message
import json
import math
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from schemas.request import printable

MAX_ECHO_CHARS = 1000        # a 422 repeats the offending input only when it is this small


class FieldError(BaseModel):
    type: str
    loc: list[str | int]
    msg: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    """Every 4xx (and the 500) body: a message, or field-level errors for a 422."""

    detail: str | list[FieldError]
    request_id: str | None = None


def error_response(what: str) -> dict:
    """An OpenAPI `responses` entry for an error status."""
    return {"model": ErrorBody, "description": what}


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json"))


def _safe(value: Any, depth: int = 0) -> Any:
    """JSON-ready `value` whose strings UTF-8 can encode (a lone surrogate becomes '\\ud800'),
    whose numbers JSON can carry (NaN and inf become 'nan' and 'inf'), cut below depth 32."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= 32:
        return "..."
    if isinstance(value, dict):
        return {printable(str(k)): _safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_safe(v, depth + 1) for v in value]
    return printable(str(value))


def _small(value: Any) -> bool:
    """Whether `value` is short enough to repeat back in a 422 (a deep one is not)."""
    try:
        return len(json.dumps(value, default=str)) <= MAX_ECHO_CHARS
    except (ValueError, TypeError, RecursionError):
        return False


def _entry(error: dict) -> dict:
    msg = error["msg"]
    if error["type"] == "value_error":          # our validators' own words, without the prefix
        msg = msg.removeprefix("Value error, ")
    out = {"type": error["type"], "loc": _safe(list(error["loc"])), "msg": _safe(msg)}
    # The whole body (loc ["body"]) or a long field is not repeated back; the loc names it.
    if len(out["loc"]) > 1 and "input" in error and _small(error["input"]):
        out["input"] = _safe(error["input"])
    ctx = {k: v for k, v in (error.get("ctx") or {}).items() if not isinstance(v, Exception)}
    if ctx:
        out["ctx"] = _safe(ctx)
    return out


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with field-level `detail`; 415 when a body was sent without a JSON content type."""
    errors = exc.errors()
    body_sent = request.headers.get("content-length", "0") != "0" or (
        "chunked" in request.headers.get("transfer-encoding", ""))
    about_body = any(e["loc"][:1] == ("body",) for e in errors)
    if body_sent and about_body and not _is_json(request.headers.get("content-type")):
        return JSONResponse({"detail": "send the request body as JSON with "
                             "'Content-Type: application/json'"}, status_code=415)
    return JSONResponse({"detail": [_entry(e) for e in errors]}, status_code=422)
