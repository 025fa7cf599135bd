"""``POST /admin/reload``: publish a version, roll back, or reload ``CURRENT`` now, behind a bearer token.

With no ``MNIST_ADMIN_TOKEN`` configured the admin routes answer 404, as if absent: an
unconfigured service is never open. The token is compared in constant time.

A request reaches one worker. It validates and swaps the model itself and moves ``CURRENT``;
the other workers follow the pointer within ``MNIST_RELOAD_INTERVAL``, and the answer waits
(a few seconds at most) until they report the version. Where they cannot follow (the watch off,
or ``MNIST_MODEL_PATH`` pinning every worker to one file) and there is more than one worker,
the answer is 409 and nothing changes.
"""

from __future__ import annotations

import asyncio
import hmac
import os

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError

from app.config import Settings
from app.deps import SettingsDep, StoreDep
from app.errors import InputError
from app.registry import CheckpointError, version_path
from app.schemas import ErrorResponse, ReloadRequest, ReloadResponse
from app.serving import declared_length
from app.store import ModelStore, ReloadError, ServedModel

__all__ = ["router"]

# The body names at most a version: anything bigger is refused while reading.
MAX_ADMIN_BODY = 4096
# The longest the answer waits for the other workers to report the new version.
MAX_CONVERGE_WAIT = 10.0


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


def unreachable_workers(store: ModelStore, settings: Settings) -> str | None:
    """Why a reload here cannot reach every worker of the server, or None when it can."""
    workers = max(settings.workers, len(store.registry.snapshot()))
    if workers <= 1:
        return None
    only_this = f"a reload here would switch only this worker (pid {os.getpid()}), not all {workers}"
    if settings.model_path is not None:
        return (
            f"MNIST_MODEL_PATH pins every worker to {settings.model_path}: {only_this}; "
            "change MNIST_MODEL_PATH and restart the server instead"
        )
    if settings.reload_interval <= 0:
        return (
            f"the pointer watch is off (MNIST_RELOAD_INTERVAL=0): {only_this}; publish with "
            "`python -m training.publish VERSION` and restart the server, or set MNIST_RELOAD_INTERVAL"
        )
    return None


async def _wait_for_workers(store: ModelStore, version: str, timeout: float) -> tuple[int, int]:
    """(live workers, those serving ``version``) once all do, or when ``timeout`` runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        workers = store.registry.snapshot()
        total = max(len(workers), 1)  # no status files (an unwritable /tmp): this worker is all we know
        serving = sum(1 for w in workers if w.get("version") == version) if workers else 1
        if serving >= total or loop.time() >= deadline:
            return total, serving
        await asyncio.sleep(0.05)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], include_in_schema=True)


@router.post(
    "/reload",
    summary="Make a version current for every worker (or roll back, or reload CURRENT) after validating it",
    response_model=ReloadResponse,
    responses={
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse, "description": "admin disabled (no token configured) or unknown version"},
        409: {
            "model": ErrorResponse,
            "description": "the reload cannot reach every worker (watch off or MNIST_MODEL_PATH pinned, with several "
            "workers), or there is nothing to roll back to; nothing changed",
        },
        422: {"model": ErrorResponse, "description": "the version was rejected; the previous model keeps serving"},
        503: {
            "model": ErrorResponse,
            "description": "the version could not be read just now (retry), or the pointer could not be written",
        },
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
        }
    },
)
async def reload(request: Request, store: StoreDep, settings: SettingsDep) -> ReloadResponse:
    # The body is read here, after require_admin: an unauthenticated caller never gets it parsed.
    declared = declared_length(request.headers.get("content-length"))
    if declared is not None and declared > MAX_ADMIN_BODY:
        raise InputError(413, f"request body of {declared} bytes is over the limit of {MAX_ADMIN_BODY} bytes")
    # The pipeline's reader: the same size cut-off while streaming and the same body deadline.
    raw = await request.app.state.pipeline.read_body(request.receive, declared, MAX_ADMIN_BODY)
    try:
        body = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise HTTPException(
            422, f'expected {{"version": "..."}}, {{"previous": true}} or no body: {problems}'
        ) from None
    if body.version is not None and body.previous:
        raise HTTPException(422, 'give either "version" or "previous": true, not both')
    if body.version is not None:
        try:
            path = version_path(store.models_dir, body.version)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        if not path.is_file():
            raise HTTPException(404, f"no stored version {body.version!r} in {store.models_dir}")
    reason = unreachable_workers(store, settings)
    if reason is not None:
        raise HTTPException(409, reason)
    previous = store.serving_version
    note = None
    served: ServedModel
    try:
        if body.previous:
            target, served = await store.rollback()
            note = f"rolled back to {target.version}: {target.reason}"
        elif body.version is not None:
            served = await store.publish(body.version)
        else:
            served = await store.reload()
    except ReloadError as exc:
        if exc.transient:
            raise HTTPException(
                503,
                f"could not read the version now, still serving {store.serving_version}: {exc}",
                headers={"Retry-After": "1"},
            ) from None
        raise HTTPException(422, f"reload rejected, still serving {store.serving_version}: {exc}") from None
    except CheckpointError as exc:  # nothing to roll back to
        raise HTTPException(409, f"cannot roll back: {exc}") from None
    except OSError as exc:  # CURRENT or LAST_GOOD could not be written: a read-only folder, a full disk
        raise HTTPException(
            503, f"could not write the pointer in {store.models_dir} ({exc}); nothing was published"
        ) from None
    timeout = min(MAX_CONVERGE_WAIT, 4 * settings.reload_interval + 2) if store.watching else 0.0
    total, serving = await _wait_for_workers(store, served.version, timeout)
    return ReloadResponse(
        version=served.version,
        previous=previous,
        pid=os.getpid(),
        workers_total=total,
        workers_serving=serving,
        note=note,
    )
