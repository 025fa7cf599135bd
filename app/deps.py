"""Typed dependencies: handlers reach settings and the live model through these."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.serving import current_model
from app.store import ModelStore, ServedModel

__all__ = ["ServedDep", "SettingsDep", "StoreDep", "read_body"]


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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes.

    A declared ``Content-Length`` over the limit is refused before reading anything; a chunked
    or lying body is cut off while streaming, so memory never holds more than ``limit`` bytes.
    """
    from app.errors import InputError

    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InputError(400, f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise InputError(413, f"request body of {size} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise InputError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
