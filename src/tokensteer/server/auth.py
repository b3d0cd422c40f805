"""The API key: when the server has one, every ``/v1`` route (and ``/tokenize``, ``/detokenize``)
needs ``Authorization: Bearer KEY``, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from tokensteer.server.errors import APIError


def check_key(request: Request) -> None:
    """A FastAPI dependency: refuse with 401 unless the request carries the server's key."""
    key: str | None = request.app.state.ctx.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), key.encode("utf-8"))
    if not ok:
        what = "no API key was given" if not given else "the API key is wrong"
        raise APIError(401, f"{what}; send the server's key as 'Authorization: Bearer KEY' (the openai client's api_key)",
                       code="invalid_api_key")
