"""Errors as OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``.

Every mistake a client can make is a 4xx with a one-line message; anything else is a 500 whose
body says only that the server failed (the traceback goes to the server's log, never the client).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokensteer.errors import UserError

log = logging.getLogger("tokensteer.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
         413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}  # fmt: skip


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_exception(e: BaseException) -> APIError:
    """The APIError a client sees for ``e``: user mistakes as 400 with their message, the rest as a
    bare 500 (logged here with its traceback)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UserError):
        return APIError(400, one_line(str(e)))
    log.error("request failed", exc_info=e)
    return APIError(500, "the server failed while handling this request; the server log has the details", code="internal_error")


def one_line(msg: str) -> str:
    """Messages from the formula parser draw a caret under the column on extra lines; keep them, joined."""
    return " | ".join(line.strip() for line in msg.splitlines() if line.strip()) or "bad request"


def install(app: FastAPI) -> None:
    """Route every error, FastAPI's and Starlette's included, through the OpenAI error object."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(UserError)
    async def user_error(_: Request, e: UserError) -> JSONResponse:
        return from_exception(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: "no such route; the API lives under /v1 (see /v1/models)", 405: "this route does not take that HTTP method"}
        err = APIError(e.status_code, msg.get(e.status_code, str(e.detail)), code=None)
        resp = err.response()
        for k, v in (e.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        return APIError(400, str(first.get("msg")), param=".".join(str(x) for x in first.get("loc", ()))).response()

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        return from_exception(e).response()
