"""`/v1/models`: the one model this gateway serves."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends

from gateway.errors import ERROR_RESPONSES
from gateway.schemas.common import ModelCard, ModelList
from gateway.serving import ServingDep
from gateway.tenants import current_tenant

router = APIRouter(dependencies=[Depends(current_tenant)], responses=ERROR_RESPONSES)


@router.get("/v1/models", response_model=ModelList)
async def list_models(serving: ServingDep) -> ModelList:
    return ModelList(data=[ModelCard(id=await serving.model_name(), created=int(time.time()))])
