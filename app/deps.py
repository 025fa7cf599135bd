"""Typed dependencies: handlers reach settings and the live model through these."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.serving import current_model
from app.store import ModelStore, ServedModel

__all__ = ["ServedDep", "SettingsDep", "StoreDep"]


# async: a plain `def` dependency costs a threadpool round trip per request.
async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _store(request: Request) -> ModelStore:
    store: ModelStore = request.app.state.store
    return store


async def _served(store: Annotated[ModelStore, Depends(_store)]) -> ServedModel:
    # Read once: the request keeps this model even if a reload swaps another in meanwhile.
    return current_model(store)


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[ModelStore, Depends(_store)]
ServedDep = Annotated[ServedModel, Depends(_served)]
