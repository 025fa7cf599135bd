"""``POST /admin/reload``: load a version now (also a rollback), behind a bearer token.

With no ``MNIST_ADMIN_TOKEN`` configured the admin routes answer 404, as if absent: an
unconfigured service is never open. The token is compared in constant time.
"""

from __future__ import annotations

import hmac
import os

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError

from app.deps import SettingsDep, StoreDep, read_body
from app.registry import version_path
from app.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from app.store import ReloadError

__all__ = ["router"]

# The body names at most a version: anything bigger is refused while reading.
MAX_ADMIN_BODY = 4096


def require_admin(request: Request, settings: SettingsDep) -> None:
    if settings.admin_token is None:
        raise HTTPException(404, "Not Found")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(token.strip().encode(), expected):
        raise HTTPException(403, "invalid token")


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], include_in_schema=True)


@router.post(
    "/reload",
    summary="Validate and load a version now; with a version, also make it current for every worker",
    response_model=ReloadResponse,
    responses={
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse, "description": "admin disabled (no token configured) or unknown version"},
        422: {"model": ErrorResponse, "description": "the version was rejected; the previous model keeps serving"},
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
        }
    },
)
async def reload(request: Request, store: StoreDep) -> ReloadResponse:
    # The body is read here, after require_admin: an unauthenticated caller never gets it parsed.
    raw = await read_body(request, MAX_ADMIN_BODY)
    try:
        body = ReloadRequest.model_validate_json(raw) if raw.strip() else None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise HTTPException(422, f'expected {{"version": "..."}} or no body: {problems}') from None
    version = body.version if body else None
    previous = store.serving_version
    if version is not None:
        try:
            path = version_path(store.models_dir, version)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if not path.is_file():
            raise HTTPException(404, f"no stored version {version!r} in {store.models_dir}")
    try:
        served = await store.reload(version, publish=version is not None)
    except ReloadError as exc:
        raise HTTPException(422, f"reload rejected, still serving {store.serving_version}: {exc}") from None
    return ReloadResponse(version=served.version, previous=previous, pid=os.getpid())
