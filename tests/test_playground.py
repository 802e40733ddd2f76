"""The playground at GET /, in a real headless Chromium on the bundled demo model.

The server runs with an API key: the page and its files load without it, /v1 does not. Chromium and its driver
are the Debian packages (`apt-get install -y chromium chromium-driver`); selenium is given the driver's path, so
Selenium Manager, which would download one, never runs. Without them these tests fail, never skip.

EDGEVLM_SCREENSHOT=docs/playground.png saves the page after the successful answer (the README's picture).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image, ImageDraw

from conftest import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "models" / "demo-shapes"
KEY = "sesame"
BLUE = (30, 80, 225)
QUESTION = "What shape is in the image?"  # the demo model's training phrasings (export/demo/data.py)
FOLLOW_UP = "What color is the shape?"
TIMEOUT = 30  # seconds any one wait may take; the demo model answers in well under one


@pytest.fixture(scope="module")
def demo_server():
    assert (PACKAGE / "model.json").is_file(), f"the demo package is missing: {PACKAGE}"
    process = ServerProcess(env={"EDGEVLM_API_KEY": KEY})  # no --model: the bundled demo model
    yield process
    assert process.stop() == 0, "".join(process.lines)


def get(server, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    url = urlparse(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def triangle_png(path: Path, size=(2000, 1500)) -> Path:
    """A blue triangle on white, larger than the page's 1536 px limit: the browser scales it down."""
    w, h = size
    image = Image.new("RGB", size, "white")
    cx, cy, r = w / 2, h / 2, h * 0.22
    ImageDraw.Draw(image).polygon([(cx, cy - r), (cx + r * 0.87, cy + r / 2), (cx - r * 0.87, cy + r / 2)], fill=BLUE)
    image.save(path)
    return path


# ------------------------------------------------------------------------------------------- without a browser


def test_page_and_its_files_load_without_a_key_and_refer_to_nothing_elsewhere(demo_server):
    from edgevlm.runtime.server import PLAYGROUND

    assert sorted(p.name for p in PLAYGROUND.iterdir()) == ["index.html", "playground.css", "playground.js"]
    status, headers, html = get(demo_server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html"), (status, headers)
    assert "default-src 'self'" in headers["content-security-policy"]
    page = html.decode("utf-8")
    assert "<title>edgevlm playground</title>" in page
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sorted(assets) == ["/playground/playground.css", "/playground/playground.js"], assets
    types = {"/playground/playground.css": "text/css", "/playground/playground.js": "javascript"}
    bodies = {"/": page}
    for asset in assets:
        status, headers, body = get(demo_server, asset)
        assert status == 200 and types[asset] in headers["content-type"], (asset, status, headers)
        assert body == (PLAYGROUND / asset.rsplit("/", 1)[1]).read_bytes()
        bodies[asset] = body.decode("utf-8")
    for name, text in bodies.items():  # offline: no CDN, no fonts, no absolute or protocol-relative URL
        assert not re.search(r"https?:|//[\w.-]+\.\w", re.sub(r"^\s*//.*$", "", text, flags=re.M)), name
        assert "@import" not in text and "url(" not in text, name
    assert set(re.findall(r'fetch\("([^"]+)"', bodies["/playground/playground.js"])) == {
        "/v1/models", "/v1/chat/completions"}
    # The key still guards the API, and a missing file is the server's JSON 404.
    status, _, body = get(demo_server, "/v1/models")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert get(demo_server, "/v1/models", {"Authorization": f"Bearer {KEY}"})[0] == 200
    status, _, body = get(demo_server, "/playground/missing.js")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert get(demo_server, "/playground/../server.py")[0] == 404


# ------------------------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not chromium or not Path(driver_path).is_file():
        pytest.fail("tests/test_playground.py needs Chromium and its driver: apt-get install -y chromium "
                    f"chromium-driver (found chromium={chromium}, chromedriver={Path(driver_path).is_file()})",
                    pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"tests/test_playground.py needs selenium: {sys.executable} -m pip install selenium",
                    pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1200,940", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps", "--hide-scrollbars"):
        options.add_argument(arg)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # were Selenium Manager ever asked, it must not go online
        # An explicit driver path: selenium skips Selenium Manager altogether (no download, no network).
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(condition, message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def finished(driver) -> str | None:
    state = by_id(driver, "status").get_attribute("data-state")
    return state if state in ("done", "error", "stopped") else None


def ask(driver, question: str) -> str:
    """Type a question, send it, wait for the answer to end; the state it ended in."""
    status = by_id(driver, "status")
    sent = int(status.get_attribute("data-requests"))
    box = by_id(driver, "question")
    box.clear()
    box.send_keys(question)
    by_id(driver, "send").click()
    wait(driver, lambda d: int(status.get_attribute("data-requests")) == sent + 1, "the request was not sent")
    return wait(driver, finished, f"no answer to {question!r} within {TIMEOUT} s")


def turns(driver) -> list[tuple[str, str]]:
    from selenium.webdriver.common.by import By

    return [(t.get_attribute("class"), t.text) for t in driver.find_elements(By.CSS_SELECTOR, "#conversation .turn")]


def save_screenshot(driver, path: str) -> None:
    """The page as a PNG of at most 256 colours (small enough for the repository)."""
    import io

    driver.execute_script("window.scrollTo(0, 0)")
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def test_streamed_answer_and_a_follow_up_about_the_same_image(demo_server, browser, tmp_path):
    driver = browser
    driver.get(demo_server.url + "/")
    # No key typed yet: listing the models is refused, and the page says so.
    wait(driver, lambda d: "invalid or missing API key" in by_id(d, "error").text, "no 401 shown for /v1/models")
    by_id(driver, "api-key").send_keys(KEY)
    by_id(driver, "file").send_keys(str(triangle_png(tmp_path / "triangle.png")))
    # Larger than 1536 px: scaled down in the browser and sent as JPEG (the change event re-listed the models).
    wait(driver, lambda d: by_id(d, "image-info").get_attribute("data-width") == "1536", "the image was not resized")
    assert by_id(driver, "image-info").get_attribute("data-height") == "1152"
    assert "2000\u00d71500, resized to 1536\u00d71152 JPEG" in by_id(driver, "image-info").text
    assert by_id(driver, "preview").get_attribute("src").startswith("data:image/jpeg;base64,")

    assert ask(driver, QUESTION) == "done", by_id(driver, "error").text
    status, _, body = get(demo_server, "/v1/models", {"Authorization": f"Bearer {KEY}"})
    name = json.loads(body)["data"][0]["id"]
    wait(driver, lambda d: by_id(d, "model").text == name, f"the model's name {name!r} never appeared")  # key typed
    assert not by_id(driver, "error").is_displayed()
    (user_class, question), (answer_class, answer) = turns(driver)
    assert "user" in user_class and question == QUESTION and "assistant" in answer_class
    assert "triangle" in answer.lower(), answer
    # Streamed: the page rendered the answer delta by delta, and timed it.
    deltas = int(by_id(driver, "stats").get_attribute("data-deltas"))
    assert deltas > 1, deltas
    assert re.fullmatch(r"\d+\.\d\d s", by_id(driver, "ttft").text), by_id(driver, "ttft").text
    assert re.fullmatch(r"\d+\.\d", by_id(driver, "tps").text), by_id(driver, "tps").text
    assert int(by_id(driver, "tokens").text) >= deltas  # usage's completion_tokens (the end token counts too)

    # A second turn about the same image: answerable only if the image went along in the first user turn.
    assert ask(driver, FOLLOW_UP) == "done", by_id(driver, "error").text
    conversation = turns(driver)
    assert [c.split()[-1] for c, _ in conversation] == ["user", "assistant", "user", "assistant"]
    assert "blue" in conversation[3][1].lower(), conversation
    if os.environ.get("EDGEVLM_SCREENSHOT"):
        save_screenshot(driver, os.environ["EDGEVLM_SCREENSHOT"])


def test_errors_are_shown_and_a_schema_is_sent(demo_server, browser, tmp_path):
    driver = browser
    driver.get(demo_server.url + "/")
    by_id(driver, "file").send_keys(str(triangle_png(tmp_path / "small.png", size=(320, 240))))
    wait(driver, lambda d: "sent as it is" in by_id(d, "image-info").text, "the image was not taken")
    assert by_id(driver, "preview").get_attribute("src").startswith("data:image/png;base64,")

    # No key: the server's 401 message, from its JSON body, on the page; the question is not lost.
    assert ask(driver, QUESTION) == "error"
    error = by_id(driver, "error")
    assert error.is_displayed() and "The request failed: 401: invalid or missing API key" in error.text, error.text
    assert by_id(driver, "question").get_attribute("value") == QUESTION
    assert [c for c, _ in turns(driver)] == ["turn user failed"]  # nothing joined the conversation

    # A schema that is not JSON is an error in the page, and nothing is sent.
    by_id(driver, "api-key").send_keys(KEY)
    by_id(driver, "schema").send_keys("{not json")
    by_id(driver, "send").click()
    wait(driver, lambda d: "The JSON schema is not valid JSON" in by_id(d, "error").text, "no schema error shown")
    assert len(turns(driver)) == 1 and by_id(driver, "status").get_attribute("data-state") == "error"

    # A valid schema goes out as response_format: the answer is the JSON it allows. Unconstrained, the demo model
    # answers "Answer in JSON." with shape, color and count; this schema allows the shape alone.
    from edgevlm.export.demo.data import SHAPES

    schema = {"type": "object", "properties": {"shape": {"enum": list(SHAPES)}}, "required": ["shape"],
              "additionalProperties": False}
    by_id(driver, "schema").clear()
    by_id(driver, "schema").send_keys(json.dumps(schema))
    assert ask(driver, "Answer in JSON.") == "done", by_id(driver, "error").text
    assert not by_id(driver, "error").is_displayed()
    assert json.loads(turns(driver)[-1][1]) == {"shape": "triangle"}


DROP_AND_PASTE = """
const [kind, done] = [arguments[0], arguments[arguments.length - 1]];
const canvas = document.createElement("canvas");
canvas.width = 300; canvas.height = 200;
const ctx = canvas.getContext("2d");
ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, 300, 200);
ctx.fillStyle = "rgb(35,165,50)"; ctx.fillRect(110, 60, 80, 80);
canvas.toBlob((blob) => {
  const data = new DataTransfer();
  data.items.add(new File([blob], kind + ".png", {type: "image/png"}));
  const event = kind === "drop" ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                                : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
  (kind === "drop" ? document.getElementById("drop") : document).dispatchEvent(event);
  done(true);
}, "image/png");
"""


def test_drop_and_paste_an_image(demo_server, browser):
    driver = browser
    driver.get(demo_server.url + "/")
    for kind in ("drop", "paste"):
        driver.execute_async_script(DROP_AND_PASTE, kind)
        wait(driver, lambda d: by_id(d, "image-info").text.startswith(f"{kind}.png: 300\u00d7200"),
             f"the {kind}ped image was not taken")
        assert by_id(driver, "preview").get_attribute("src").startswith("data:image/png;base64,")
    assert "Could not read" not in by_id(driver, "error").text and "Not an image" not in by_id(driver, "error").text


STOP_AT_FIRST_DELTA = """
const stats = document.getElementById("stats");
new MutationObserver((_, observer) => {
  if (Number(stats.dataset.deltas) >= 1) { observer.disconnect(); document.getElementById("stop").click(); }
}).observe(stats, {attributes: true, attributeFilter: ["data-deltas"]});
"""


def test_stop_aborts_the_stream(demo_server, browser):
    """Stop, clicked by the page's own observer as the first delta renders: the fetch is aborted, the partial
    answer stays marked as stopped, and the server cancels the generation (a 400-token answer, forced by a schema)."""
    driver = browser
    driver.get(demo_server.url + "/")
    cancelled = json.loads(get(demo_server, "/health")[2])["cancelled"]
    by_id(driver, "api-key").send_keys(KEY)
    by_id(driver, "max-tokens").clear()
    by_id(driver, "max-tokens").send_keys("400")
    by_id(driver, "schema").send_keys(json.dumps({"type": "array", "items": {"enum": ["triangle"]}, "minItems": 400}))
    driver.execute_script(STOP_AT_FIRST_DELTA)
    assert ask(driver, "Answer in JSON.") == "stopped", by_id(driver, "error").text
    deltas = int(by_id(driver, "stats").get_attribute("data-deltas"))
    assert 1 <= deltas < 100, deltas
    (_, _), (answer_class, answer) = turns(driver)
    assert answer_class == "turn assistant" and answer.startswith("[") and answer.endswith("(stopped)"), answer
    wait(driver, lambda d: json.loads(get(demo_server, "/health")[2])["cancelled"] == cancelled + 1,
         "the server did not cancel the stopped generation")
    assert not by_id(driver, "error").is_displayed()
