"""API keys: the `/v1/` routes depend on `require_api_key` when the gateway has keys set."""

from __future__ import annotations

import hmac

from fastapi import Request

from gateway.errors import APIError


async def require_api_key(request: Request) -> None:
    """Pass with `Authorization: Bearer <one of the gateway's api_keys>`, or when it has none; 401 otherwise."""
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k) for k in keys):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                       headers={"www-authenticate": "Bearer"})
