"""The digit pad's HTTP side, in process: the page, its assets, caching and security headers.

The browser behaviour (drawing, uploads, errors) is tested in a real Chromium by test_ui_e2e.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from app.routes import ui

STATIC = Path(ui.__file__).resolve().parent.parent / "static"
# URLs a page would fetch: anything with a scheme and host. The SVG namespace is only a name.
_EXTERNAL = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The whole app in process, its lifespan run (the model loaded) around the test."""
    monkeypatch.setenv("MNIST_RUNTIME_DIR", str(tmp_path / "runtime"))
    app = create_app(Settings(model_dir=models_dir, reload_interval=0, access_log=False))
    transport = httpx.ASGITransport(app=app)
    async with app.lifespan(), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.mark.anyio
async def test_root_serves_the_page_with_security_and_cache_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.content == (STATIC / "index.html").read_bytes()
    csp = response.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"
    assert re.fullmatch(r'"[0-9a-f]{32}"', response.headers["etag"])
    for needle in ('id="canvas"', 'id="clear"', 'id="upload"', 'type="file"', 'id="chart"', 'src="static/pad.js"'):
        assert needle in response.text


@pytest.mark.parametrize(
    ("path", "media_type", "name"),
    [
        ("/static/pad.js", "text/javascript; charset=utf-8", "pad.js"),
        ("/static/pad.css", "text/css; charset=utf-8", "pad.css"),
        ("/static/favicon.svg", "image/svg+xml", "favicon.svg"),
    ],
)
@pytest.mark.anyio
async def test_static_assets_are_served_with_their_types(
    client: httpx.AsyncClient, path: str, media_type: str, name: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.content == (STATIC / name).read_bytes()
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize("path", ["/", "/static/pad.js"])
@pytest.mark.anyio
async def test_a_matching_etag_gets_304_without_a_body(client: httpx.AsyncClient, path: str) -> None:
    etag = (await client.get(path)).headers["etag"]
    response = await client.get(path, headers={"If-None-Match": f'"other", {etag}'})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == etag
    stale = await client.get(path, headers={"If-None-Match": '"0123"'})
    assert stale.status_code == 200
    assert stale.content


@pytest.mark.anyio
async def test_head_answers_like_get_without_a_body(client: httpx.AsyncClient) -> None:
    response = await client.head("/")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["etag"] == (await client.get("/")).headers["etag"]


@pytest.mark.parametrize("name", ["index.html", "nope.js", "..%2Fmain.py", "%2E%2E%2Froutes%2Fui.py"])
@pytest.mark.anyio
async def test_only_the_listed_assets_are_served(client: httpx.AsyncClient, name: str) -> None:
    response = await client.get(f"/static/{name}")
    assert response.status_code == 404
    assert "detail" in response.json()


@pytest.mark.anyio
async def test_ui_routes_stay_out_of_the_api_schema(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/" not in paths
    assert not [p for p in paths if p.startswith("/static")]
    assert "/predict" in paths


def test_page_needs_nothing_from_the_network_and_nothing_inline() -> None:
    html = (STATIC / "index.html").read_text()
    # The CSP allows no inline code: every script is an external same-origin file, no handlers, no style="".
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="static/pad.js" defer>']
    assert "</script>" in html
    assert re.search(r"<script[^>]*>\s*</script>", html)
    assert not re.search(r"\son[a-z]+\s*=", html)
    assert not re.search(r"\sstyle\s*=", html)
    assert "<style" not in html
    for name in ("index.html", "pad.js", "pad.css", "favicon.svg"):
        text = (STATIC / name).read_text().replace(_SVG_NAMESPACE, "")
        assert not _EXTERNAL.search(text), f"{name} refers to an external URL"
        assert "@import" not in text
        assert "url(" not in text
        assert "eval(" not in text
