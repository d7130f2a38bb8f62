"""Operators' routes: `/health` (load balancers, orchestrators) and `/metrics` (Prometheus); no API key."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.serving import ServingDep

router = APIRouter()


@router.get("/health")
async def health(serving: ServingDep) -> JSONResponse:
    timeout_s = serving.settings.health_timeout_s
    vision_up = await serving.vision.check(timeout_s)
    language_up = await serving.language.check(timeout_s)
    return JSONResponse({"vision_servers_up": vision_up, "language_servers_up": language_up},
                        status_code=200 if vision_up and language_up else 503)


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
