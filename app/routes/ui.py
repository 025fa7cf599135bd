"""The digit pad: ``GET /`` serves a one-page drawing UI that posts PNGs to ``/predict``.

No build step and no external assets, so the page works offline. The page, its script, its
stylesheet and its icon live in ``app/static/``; they are read once on first use and answered
with an ETag and ``Cache-Control: no-cache`` (revalidated each time, a 304 when unchanged), so
a new release is picked up without stale caches. The page's Content-Security-Policy allows
nothing but these same-origin files and ``fetch`` to this origin.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

__all__ = ["CONTENT_SECURITY_POLICY", "router"]

router = APIRouter(tags=["ui"], include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# The only files served: a fixed map, so a request path can never name anything else.
ASSETS = {
    "pad.js": "text/javascript; charset=utf-8",
    "pad.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",  # blob: for the preview of an uploaded PNG
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class _Asset:
    body: bytes
    etag: str
    media_type: str


@functools.cache
def _load(name: str, media_type: str) -> _Asset:
    body = (STATIC_DIR / name).read_bytes()
    return _Asset(body, f'"{hashlib.sha256(body).hexdigest()[:32]}"', media_type)


def _answer(request: Request, asset: _Asset, extra: dict[str, str] | None = None) -> Response:
    headers = {"ETag": asset.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", **(extra or {})}
    if asset.etag in (tag.strip() for tag in request.headers.get("if-none-match", "").split(",")):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.api_route("/", methods=["GET", "HEAD"])
async def digit_pad(request: Request) -> Response:
    return _answer(request, _load("index.html", "text/html; charset=utf-8"), _PAGE_HEADERS)


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static_asset(request: Request, name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return _answer(request, _load(name, media_type))
