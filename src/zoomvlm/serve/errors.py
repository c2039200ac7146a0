"""Errors the zoom server answers with, in OpenAI's error shape.

Every refusal (bad input, limits, auth, overload, upstream faults) leaves the server as
``{"error": {"message", "type", "param", "code"}}`` with a matching HTTP status, which is what the
official ``openai`` client parses into ``BadRequestError``, ``AuthenticationError``, ``APIStatusError``...
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

__all__ = ["ServeError", "error_body", "error_response"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    502: "upstream_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ServeError(Exception):
    """A request the server refuses or cannot complete; becomes one HTTP error response.

    Args:
        status: HTTP status (400 bad input, 401 auth, 413 body too large, 503 overloaded, 502/504 upstream).
        message: human-readable reason, sent to the client (never contains secrets or image bytes).
        code: short machine-readable reason, e.g. ``"image_too_large"``.
        param: the request field at fault, e.g. ``"messages[0].content[1].image_url"``.
        headers: extra response headers (e.g. ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}


def error_response(err: ServeError) -> JSONResponse:
    """The HTTP response for ``err`` (its status, OpenAI's error shape, its extra headers)."""
    return JSONResponse(error_body(err.status, err.message, err.code, err.param), err.status, headers=err.headers)
