"""The digit pad in a real headless Chromium against a real uvicorn process.

Needs Debian's ``chromium`` (``scripts/test-deps.sh`` installs it) and the ``playwright`` Python
package; Playwright's own browser download is not used. Skips, saying why, when either is missing
or Chromium cannot start. ``UPDATE_SCREENSHOT=1`` copies the drawn-7 screenshot to
``docs/digit-pad.png`` (the README's picture).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.registry import read_pointer, version_path, write_pointer
from tests.conftest import ROOT, Server, start_server

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[dev]')"
)
expect = sync_api.expect

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
# The machine has no network: no GPU, no sandbox (containers), and none of Chromium's background calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SEVEN_PNG = ROOT / "tests" / "fixtures" / "seven.png"
README_SCREENSHOT = ROOT / "docs" / "digit-pad.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMEOUT_MS = 15_000
_DONE_OR_ERROR = re.compile(r"^(done|error)$")

Stroke = list[tuple[float, float]]  # points in canvas fractions: (0, 0) top left, (1, 1) bottom right


def _ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 28) -> Stroke:
    # Starts at the top and goes a little past the start so the loop closes, as a hand does.
    return [
        (cx + rx * math.sin(2 * math.pi * i / points), cy - ry * math.cos(2 * math.pi * i / points))
        for i in range(points + 2)
    ]


DIGITS: dict[str, list[Stroke]] = {
    "0": [_ellipse(0.5, 0.5, 0.2, 0.32)],
    "1": [[(0.52, 0.15), (0.5, 0.5), (0.48, 0.85)]],
    "7": [[(0.25, 0.2), (0.72, 0.2), (0.58, 0.45), (0.44, 0.85)]],
}


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One uvicorn for the module (each test gets a fresh browser context)."""
    root = tmp_path_factory.mktemp("ui-server")
    models = root / "models"
    models.mkdir()
    bundled = version_path(ROOT / "models", read_pointer(ROOT / "models") or "")
    shutil.copy2(bundled, models / bundled.name)
    write_pointer(models, bundled.stem)
    server = start_server(root, env={"MNIST_MODEL_DIR": str(models)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (bash scripts/test-deps.sh installs Debian's chromium)")
    playwright = sync_api.sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
    except sync_api.Error as exc:
        playwright.stop()
        pytest.skip(f"Chromium at {CHROMIUM} could not be launched: {exc.message.splitlines()[0]}")
    yield browser
    browser.close()
    playwright.stop()


class Pad:
    """A page on the digit pad, with what it logged and requested."""

    def __init__(self, page: Any, server: Server) -> None:
        self.page = page
        self.server = server
        self.problems: list[str] = []
        self.predict_requests: list[tuple[dict[str, str], bytes]] = []  # (headers, body) of each POST /predict
        self.predict_urls: list[str] = []
        self.predict_answers: dict[int, dict[str, Any]] = {}  # request index -> the JSON of its 200 answer
        self.foreign_requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("request", self._request)
        # Routed rather than observed: only an intercepted request exposes a Blob body to the test.
        page.route(re.compile(re.escape(server.base_url) + r"/predict(\?.*)?$"), self._predict)

    def _console(self, message: Any) -> None:
        # A CSP violation, a failed asset or a script error all land here as errors.
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def _request(self, request: Any) -> None:
        if not request.url.startswith(self.server.base_url + "/"):
            self.foreign_requests.append(request.url)

    def _predict(self, route: Any) -> None:
        request = route.request
        assert request.method == "POST"
        index = len(self.predict_requests)
        self.predict_requests.append((request.headers, request.post_data_buffer or b""))
        self.predict_urls.append(request.url)
        try:
            response = route.fetch()
            body = response.body()
            route.fulfill(response=response, body=body)
        except sync_api.Error:
            return  # the page dropped this request for a newer one (a stroke went on)
        if response.status == 200:
            self.predict_answers[index] = json.loads(body)

    @property
    def result(self) -> Any:
        return self.page.locator("#result")

    @property
    def label(self) -> Any:
        return self.page.locator("#label")

    @property
    def error(self) -> Any:
        return self.page.locator("#error")

    def open(self) -> None:
        self.page.goto(self.server.base_url + "/")
        expect(self.page.locator("#model")).to_contain_text("test accuracy")

    def draw(self, strokes: list[Stroke]) -> None:
        box = self.page.locator("#canvas").bounding_box()
        assert box is not None
        mouse = self.page.mouse
        for stroke in strokes:
            points = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in stroke]
            mouse.move(*points[0])
            mouse.down()
            for x, y in points[1:]:
                mouse.move(x, y, steps=6)
            mouse.up()

    def wait_settled(self) -> str:
        """Wait until the latest drawing or upload has its answer; returns "done" or "error"."""
        expect(self.result).to_have_attribute("data-state", _DONE_OR_ERROR, timeout=TIMEOUT_MS)
        return str(self.result.get_attribute("data-state"))

    def chart(self) -> list[tuple[str, str, float, bool]]:
        """(digit, percentage text, bar width in px, is highlighted) for each row of the chart."""
        rows = self.page.locator("#chart tbody tr")
        return [
            (
                row.locator("th").inner_text(),
                row.locator(".pct").inner_text(),
                row.locator(".fill").evaluate("e => e.getBoundingClientRect().width"),
                "top" in (row.get_attribute("class") or ""),
            )
            for row in rows.all()
        ]

    def seen(self) -> list[int]:
        """The grey levels of the page's 28x28 "what the model saw" canvas, row by row."""
        return self.page.evaluate(
            """() => {
                const data = document.getElementById("seen-canvas").getContext("2d").getImageData(0, 0, 28, 28).data;
                return Array.from({ length: 784 }, (_, i) => data[4 * i]);
            }"""
        )

    def shot(self, path: Path) -> Path:
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 1000
        return path

    def assert_clean(self) -> None:
        assert not self.problems, self.problems
        assert not self.foreign_requests, f"the page reached outside the service: {self.foreign_requests}"


@pytest.fixture
def pad(browser: Any, server: Server) -> Iterator[Pad]:
    context = browser.new_context(viewport={"width": 1000, "height": 720}, device_scale_factor=1)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    pad = Pad(page, server)
    pad.open()
    yield pad
    context.close()
    pad.assert_clean()


def _detail(server: Server, body: bytes, mime: str) -> tuple[int, str]:
    """What the server itself says about this body sent as ``mime`` (the page must show this very text)."""
    response = httpx.post(f"{server.base_url}/predict", content=body, headers={"Content-Type": mime})
    assert response.status_code in (415, 422)
    return response.status_code, str(response.json()["detail"])


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buffer, format="PNG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("digit", sorted(DIGITS))
def test_drawn_digit_is_recognised_and_charted(pad: Pad, server: Server, digit: str, tmp_path: Path) -> None:
    info = httpx.get(f"{server.base_url}/model").json()
    expect(pad.page.locator("#model")).to_contain_text(info["version"])
    expect(pad.page.locator("#model")).to_contain_text(f"{100 * info['test_accuracy']:.2f}%")
    expect(pad.result).to_have_attribute("data-state", "empty")

    pad.draw(DIGITS[digit])
    assert pad.wait_settled() == "done"
    shot = pad.shot(tmp_path / f"drawn-{digit}.png")

    expect(pad.label).to_have_text(digit)
    chart = pad.chart()
    assert [row[0] for row in chart] == [str(d) for d in range(10)]
    percentages = [float(text.rstrip("%")) for _, text, _, _ in chart]
    assert sum(percentages) == pytest.approx(100, abs=0.6)
    assert [row[0] for row in chart if row[3]] == [digit]
    widths = [row[2] for row in chart]
    assert max(widths) == widths[int(digit)] > 50  # the winner's bar is the longest and visibly long
    expect(pad.page.locator("#status")).to_contain_text(f"Predicted {digit}")
    expect(pad.page.locator("#answered")).to_contain_text(info["version"])
    expect(pad.error).to_be_hidden()

    # What went over the wire: a real PNG of the canvas, as image/png, like any other client.
    assert pad.predict_requests
    for headers, body in pad.predict_requests:
        assert headers["content-type"] == "image/png"
        assert body.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(pad.predict_requests[-1][1])) as sent:
        assert sent.size == (280, 280)

    if digit == "7" and os.environ.get("UPDATE_SCREENSHOT"):
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SCREENSHOT)


def test_clear_resets_the_pad_and_posts_nothing(pad: Pad, tmp_path: Path) -> None:
    pad.draw(DIGITS["1"])
    assert pad.wait_settled() == "done"
    sent = len(pad.predict_requests)

    pad.page.get_by_role("button", name="Clear").click()
    expect(pad.result).to_have_attribute("data-state", "empty")
    expect(pad.label).to_have_text("–")
    assert {text for _, text, _, top in pad.chart() if not top} == {"–"}
    # Longer than the page's debounce and maximum wait: a blank canvas is never sent.
    pad.page.wait_for_timeout(1000)
    assert len(pad.predict_requests) == sent
    canvas_is_black = pad.page.evaluate(
        """() => {
            const c = document.getElementById("canvas");
            const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            for (let i = 0; i < data.length; i += 4) if (data[i] || data[i + 1] || data[i + 2]) return false;
            return true;
        }"""
    )
    assert canvas_is_black
    pad.shot(tmp_path / "cleared.png")


def test_upload_by_keyboard_recognises_the_png(pad: Pad, tmp_path: Path) -> None:
    page = pad.page
    # Ask Playwright to intercept file choosers now, well before the key press that opens one: enabling
    # interception is not awaited by Playwright, and a chooser opened before it is on is never reported.
    page.on("filechooser", lambda chooser: None)
    # Tab from the top of the page: the buttons are reachable, in order, and show a focus ring.
    focused: list[str] = []
    for _ in range(8):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("() => document.activeElement.id || document.activeElement.tagName"))
        if focused[-1] == "upload":
            break
    assert focused[-2:] == ["clear", "upload"], focused
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")

    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(SEVEN_PNG))
    assert pad.wait_settled() == "done"
    expect(pad.label).to_have_text("7")
    expect(page.locator("#status")).to_contain_text("seven.png")
    headers, body = pad.predict_requests[-1]
    assert headers["content-type"] == "image/png"
    assert body == SEVEN_PNG.read_bytes()  # the file itself, untouched: the server does the normalising
    pad.shot(tmp_path / "uploaded-seven.png")


def test_server_errors_are_shown_to_the_user(pad: Pad, server: Server, tmp_path: Path) -> None:
    file_input = pad.page.locator("#file")
    not_png = b"these are not the pixels you are looking for\n"
    blank = _blank_png()
    for name, body, mime in (("notes.txt", not_png, "text/plain"), ("blank.png", blank, "image/png")):
        status, expected = _detail(server, body, mime)
        file_input.set_input_files(files=[{"name": name, "mimeType": mime, "buffer": body}])
        assert pad.wait_settled() == "error"
        assert pad.predict_requests[-1][0]["content-type"] == mime  # sent as what it is
        expect(pad.error).to_be_visible()
        expect(pad.error).to_contain_text(str(status))
        expect(pad.error).to_contain_text(expected)
        expect(pad.label).to_have_text("?")
        assert {text for _, text, _, _ in pad.chart()} == {"–"}
        pad.shot(tmp_path / f"error-{name}.png")

    # The next good answer takes the message away.
    file_input.set_input_files(str(SEVEN_PNG))
    assert pad.wait_settled() == "done"
    expect(pad.error).to_be_hidden()
    expect(pad.label).to_have_text("7")
    # The console errors Chromium logs for the two 4xx responses are expected here, nothing else.
    pad.problems[:] = [p for p in pad.problems if "status of 422" not in p and "status of 415" not in p]


def test_phone_width_layout_and_finger_drawing(browser: Any, server: Server, tmp_path: Path) -> None:
    context = browser.new_context(
        viewport={"width": 360, "height": 740}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    context.set_default_timeout(TIMEOUT_MS)
    try:
        page = context.new_page()
        pad = Pad(page, server)
        pad.open()
        width = page.evaluate("() => window.innerWidth")
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width
        box = page.locator("#canvas").bounding_box()
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= width
        assert box["width"] >= 250
        for name in ("Clear", "Upload an image…"):
            button = page.get_by_role("button", name=name).bounding_box()
            assert button is not None
            assert button["height"] >= 44
            assert button["x"] + button["width"] <= width

        # A finger, not a mouse: raw touch events, which Chromium turns into pointer events.
        cdp = context.new_cdp_session(page)
        top = (box["x"] + 0.5 * box["width"], box["y"] + 0.15 * box["height"])
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": top[0], "y": top[1]}]})
        for i in range(1, 21):
            y = box["y"] + (0.15 + 0.7 * i / 20) * box["height"]
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": top[0], "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        assert pad.wait_settled() == "done"
        expect(pad.label).to_have_text("1")
        # Drawing did not scroll the page away (touch-action: none on the canvas).
        assert page.evaluate("() => window.scrollY") == 0
        pad.shot(tmp_path / "phone.png")
        pad.assert_clean()
    finally:
        context.close()


def test_the_pad_shows_what_the_model_saw(pad: Pad, tmp_path: Path) -> None:
    """The 28x28 input comes back with the answer (include=input) and is drawn beside it, pixelated."""
    seen = pad.page.locator("#seen")
    expect(seen).to_be_hidden()
    pad.draw(DIGITS["7"])
    assert pad.wait_settled() == "done"
    expect(pad.label).to_have_text("7")
    expect(seen).to_be_visible()
    expect(seen).to_contain_text("What the model saw")
    assert all(url.endswith("/predict?include=input") for url in pad.predict_urls)
    answer = pad.predict_answers[len(pad.predict_requests) - 1]  # the answer to the last request: the one shown
    pixels = answer["input"]["pixels"]
    assert len(pixels) == 784
    shown = pad.seen()
    assert shown == [round(255 * min(1.0, max(0.0, v))) for v in pixels]
    # MNIST-like: a white digit on black, most of the square black.
    assert sum(v == 0 for v in shown) > 400
    box = pad.page.locator("#seen-canvas").bounding_box()
    assert box is not None
    assert box["width"] == box["height"] >= 56  # scaled up...
    rendering = pad.page.locator("#seen-canvas").evaluate("e => getComputedStyle(e).imageRendering")
    assert rendering == "pixelated"  # ...with square pixels
    pad.shot(tmp_path / "seen.png")

    # An error hides it again: a stale picture next to a message would mislead.
    pad.page.locator("#file").set_input_files(
        files=[{"name": "blank.png", "mimeType": "image/png", "buffer": _blank_png()}]
    )
    assert pad.wait_settled() == "error"
    expect(seen).to_be_hidden()
    pad.problems[:] = [p for p in pad.problems if "status of 422" not in p]


@pytest.mark.parametrize(("fmt", "mime"), [("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_upload_of_a_photo_format(pad: Pad, tmp_path: Path, fmt: str, mime: str) -> None:
    """A JPEG or WebP (what phones and chat apps produce) is sent as itself and recognised."""
    with Image.open(SEVEN_PNG) as seven:
        photo = seven.convert("RGB").resize((seven.width * 4, seven.height * 4))
    buffer = io.BytesIO()
    photo.save(buffer, format=fmt, quality=90)
    name = f"seven.{fmt.lower()}"
    pad.page.locator("#file").set_input_files(files=[{"name": name, "mimeType": mime, "buffer": buffer.getvalue()}])
    assert pad.wait_settled() == "done", pad.error.inner_text()
    expect(pad.label).to_have_text("7")
    expect(pad.page.locator("#status")).to_contain_text(name)
    expect(pad.page.locator("#seen")).to_be_visible()
    headers, body = pad.predict_requests[-1]
    assert headers["content-type"] == mime
    assert body == buffer.getvalue()
    pad.shot(tmp_path / f"uploaded-{name}.png")
