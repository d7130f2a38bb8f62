"""Errors the gateway returns in OpenAI's error JSON, and how gRPC failures map onto them."""

from __future__ import annotations

import grpc

from gateway.schemas.common import ErrorDetail, ErrorResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def to_json(self) -> dict:
        detail = ErrorDetail(message=self.message, type=ERROR_TYPES.get(self.status, "server_error"),
                             param=self.param, code=self.status)
        return ErrorResponse(error=detail).model_dump()


# The error bodies every API route may answer with, for the OpenAPI document.
ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)}


def from_grpc(exc: grpc.aio.AioRpcError, server: str) -> APIError:
    status = GRPC_TO_HTTP.get(exc.code(), 500)
    detail = exc.details() or exc.code().name
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        detail = f"{server} is unavailable: {detail}"
    return APIError(status, detail)
