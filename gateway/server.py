"""Gateway process: uvicorn serving the FastAPI app."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings


def main(settings: GatewaySettings) -> None:
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
