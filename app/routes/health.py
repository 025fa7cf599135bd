"""Liveness, readiness and model metadata."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServedDep, StoreDep
from app.registry import list_versions
from app.schemas import ModelInfo

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    summary="A model is loaded and serving (503 until then)",
    responses={503: {"description": "no model loaded yet"}},
)
async def ready(store: StoreDep) -> JSONResponse:
    served = store.current
    if served is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "model_version": served.version})


@router.get(
    "/model", summary="The serving model, every worker's version, and the last reload error", response_model=ModelInfo
)
async def model_info(store: StoreDep, served: ServedDep) -> dict[str, Any]:
    return {
        **served.describe(),
        "pid": os.getpid(),
        "last_reload_error": store.last_reload_error,
        "reloads": store.reloads,
        "watching": store.watching,
        "reload_interval": store.settings.reload_interval,
        "workers": store.registry.snapshot(),
        "available_versions": list_versions(store.models_dir),
    }
