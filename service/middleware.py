"""Pure ASGI middleware: a request id on every response, a plain 500 for unexpected errors, and
a limit on request body size."""

from __future__ import annotations

import json
import logging
import re
import uuid

REQUEST_ID = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
log = logging.getLogger("entropy_probe.app")


async def _send_json(send, status: int, payload: dict, rid: str) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (REQUEST_ID.encode(), rid.encode())]})
    await send({"type": "http.response.body", "body": body})


class RequestId:
    """Echo a sane incoming x-request-id, else make one; stored in scope['state'].

    An exception that escapes the app becomes a 500 with the request id and no stack trace
    (the log has it). It is answered here rather than by Starlette's outermost handler, which
    re-raises and makes the server drop the keep-alive connection the client will reuse.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(REQUEST_ID.encode(), b"").decode("latin-1")
        rid = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() != REQUEST_ID.encode()]
                message["headers"] = headers + [(REQUEST_ID.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error (request %s)", rid)
            if started:          # half a response is out: only closing the connection is left
                raise
            await _send_json(send, 500, {"detail": "internal server error",
                                         "request_id": rid}, rid)


class BodyLimit:
    """413 for bodies above max_bytes, by Content-Length or while streaming a chunked body."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._reject(scope, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, send):
        rid = scope.get("state", {}).get("request_id", "")
        await _send_json(send, 413, {"detail": f"request body exceeds {self.max_bytes} bytes "
                                               "(ENTROPY_PROBE_MAX_BODY_BYTES)"}, rid)
