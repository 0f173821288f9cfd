"""Bearer-token dependency: with ENTROPY_PROBE_API_TOKEN set, every route but /healthz needs it."""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.dependencies import get_settings
from service.settings import Settings

_bearer = HTTPBearer(auto_error=False, description="ENTROPY_PROBE_API_TOKEN, when the server "
                     "sets one.")


def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
                  settings: Settings = Depends(get_settings)) -> None:
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise HTTPException(401, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
