"""The HTTP API's answers: strict JSON, and every failure in the contract's error object.

`{error: {code, message, category, details, timestamp, request_id}}`, with `Retry-After` on 429 and
`WWW-Authenticate: Bearer` on 401. A handler that fails unexpectedly is answered 500 `internal` and
logged (a traceback for the first failure of each kind); the API stays open.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from agent.http_server import serving
from agent.model import iso, utcnow
from drivers.sdk.jsonio import message_bytes

REQUEST_ID_KEY = web.RequestKey("request_id", str)  # the request's id, echoed in X-Request-Id and in errors

log = structlog.get_logger("edge_agent.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # a caller's X-Request-Id is echoed only when it is this


class ApiError(Exception):
    """An error answered in the contract's error format."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        category: str = "client",
        details: Any = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.category = category
        self.details = details
        self.retry_after = retry_after


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A strict-JSON answer: NaN and infinities go out as strings, as the contract says. Written as the
    broker's messages are (ASCII, \\u escapes): outside text echoed in a message may hold a lone
    surrogate (from a JSON "\\ud800"), which UTF-8 cannot encode."""
    return web.Response(
        body=message_bytes(data), status=status, content_type="application/json", charset="utf-8", headers=headers
    )


def error_response(err: ApiError, request_id: str) -> web.Response:
    """`err` in the contract's error object."""
    body = {
        "error": {
            "code": err.code,
            "message": str(err),
            "category": err.category,
            "details": err.details or {},
            "timestamp": iso(utcnow()),
            "request_id": request_id,
        }
    }
    headers = None
    if err.status == 429:
        headers = {"Retry-After": str(err.retry_after or 1)}
    elif err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return json_response(body, err.status, headers)


class ErrorAnswers:
    """The outermost middleware: gives each request its id and turns every failure into an error object."""

    def __init__(self, max_body_bytes: Callable[[], int]) -> None:
        self._max_body_bytes = max_body_bytes  # read per request: a reload may change it
        self._crashed: set[type[BaseException]] = set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("X-Request-Id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else str(uuid.uuid4())  # only what can be echoed
        request[REQUEST_ID_KEY] = request_id
        with serving(request):
            try:
                resp = await handler(request)
            except Exception as err:
                resp = error_response(self._as_api_error(request, err), request_id)
        resp.headers["X-Request-Id"] = request_id
        return resp

    def _as_api_error(self, request: web.Request, err: Exception) -> ApiError:
        if isinstance(err, ApiError):
            return err
        if isinstance(err, web.HTTPRequestEntityTooLarge):
            return ApiError(413, "payload_too_large", f"request body over {self._max_body_bytes()} bytes")
        if isinstance(err, web.HTTPNotFound):
            return ApiError(404, "not_found", f"no route {request.method} {request.path}")
        if isinstance(err, web.HTTPMethodNotAllowed):
            return ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}")
        if isinstance(err, web.HTTPException):
            return ApiError(err.status, "http_error", err.reason)
        # A traceback for the first failure of each kind; one line for the ones after it.
        first = type(err) not in self._crashed
        self._crashed.add(type(err))
        log.error("http_handler_failed", path=request.path, error=f"{type(err).__name__}: {err}"[:300], exc_info=first)
        return ApiError(500, "internal", "internal error", "server")
