"""Gateway process: uvicorn serving the FastAPI app, every log line tagged with its request id."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.request_context import install_log_format
from gateway.settings import GatewaySettings


def main(settings: GatewaySettings) -> None:
    install_log_format()
    # log_config=None: uvicorn's loggers go through the root handlers, request id included.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)
