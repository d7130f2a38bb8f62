"""The current HTTP request's id, for every log line written while serving it."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
REQUEST_ARRIVAL_NS: ContextVar[int] = ContextVar("request_arrival_ns", default=0)  # wall clock, time.time_ns()
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def new_request_id() -> str:
    """Unguessable, so that nobody can claim another request's features."""
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` ("-" outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def install_log_format(logger: logging.Logger | None = None) -> None:
    """Put the request id into every line the handlers of `logger` (the root logger) write."""
    logger = logger or logging.getLogger()
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    for handler in logger.handlers:
        handler.addFilter(RequestIdFilter())
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
