"""Liveness, readiness and model metadata."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServedDep, StoreDep
from app.registry import inspect_folder
from app.schemas import ModelInfo

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    summary="A model is loaded and serving (503 until then); `problem` says when it is not the one CURRENT names",
    responses={503: {"description": "no model loaded yet"}},
)
async def ready(store: StoreDep) -> JSONResponse:
    served = store.current
    if served is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    # Still 200 with a problem: this worker serves a good model (the last good one) and should get
    # traffic; the problem is for whoever manages the models folder.
    return JSONResponse({"status": "ready", "model_version": served.version, "problem": store.problem})


@router.get(
    "/model",
    summary="The serving model, every worker's version, the last reload error and any problem with CURRENT",
    response_model=ModelInfo,
)
async def model_info(store: StoreDep, served: ServedDep) -> dict[str, Any]:
    folder = inspect_folder(store.models_dir)
    return {
        **served.describe(),
        "pid": os.getpid(),
        "last_reload_error": store.last_reload_error,
        "problem": store.problem,
        "last_good_version": folder.last_good,
        "reloads": store.reloads,
        "watching": store.watching,
        "reload_interval": store.settings.reload_interval,
        "workers": store.registry.snapshot(),
        "available_versions": folder.versions,
    }
