"""examples/demo.py served on a free local port: driven through gradio_client and through headless Chromium.

Both compare what the page shows with the inference API's answer for the same image and phrase. The browser test
saves a screenshot (to ``M2IST_DEMO_SCREENSHOT`` when set; docs/images/demo.png was made with
``M2IST_DEMO_ADAPTER`` = the main job's best adapter, ``M2IST_DEMO_IMAGE`` / ``M2IST_DEMO_PHRASE`` = a validation
scene of the shapes benchmark and its phrase). The demo runs in the folder that holds the adapter's folder and is
given the adapter by a relative path, so the page, and the screenshot, show no folder of this run. Chromium and its
driver come from Debian (``scripts/install.sh test`` installs them); without them the browser test fails, it is
not skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from tiny_adapter import save_tiny_adapter

from peft_m2ist.data.sample_photos import SAMPLE_PHOTOS
from peft_m2ist.inference import ReferringExpressionGrounder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
BROWSER_PHRASE = os.environ.get("M2IST_DEMO_PHRASE", "the cup of coffee")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served_from(adapter: str, fallback: Path) -> tuple[Path, str]:
    """(the folder to run the demo in, the adapter as the demo is given it): a local adapter by a path relative to
    the repository root when it lies inside the repository (`outputs/m2ist-shapes/best_adapter`), else relative to
    the folder above its own; a Hub id as it is."""
    folder = Path(adapter).resolve()
    if not folder.is_dir():
        return fallback, adapter
    if folder.is_relative_to(ROOT):
        return ROOT, folder.relative_to(ROOT).as_posix()
    return folder.parent.parent, folder.relative_to(folder.parent.parent).as_posix()


def test_a_local_adapter_is_served_by_a_relative_path(tmp_path):
    inside = ROOT / "examples"  # any folder of the repository stands in for outputs/.../best_adapter
    assert served_from(str(inside), tmp_path) == (ROOT, "examples")
    (tmp_path / "run" / "best_adapter").mkdir(parents=True)
    assert served_from(str(tmp_path / "run" / "best_adapter"), ROOT) == (tmp_path, "run/best_adapter")
    assert served_from("someone/m2ist-adapter", tmp_path) == (tmp_path, "someone/m2ist-adapter")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo on the tiny adapter (or ``M2IST_DEMO_ADAPTER``), serving on 127.0.0.1; yields (url, adapter, image)."""
    root = tmp_path_factory.mktemp("demo")
    adapter = os.environ.get("M2IST_DEMO_ADAPTER") or str(save_tiny_adapter(root).adapter)
    workdir, shown = served_from(adapter, root)
    image = root / "input.png"  # PNG: the upload decodes to the same pixels
    if os.environ.get("M2IST_DEMO_IMAGE"):  # the README's screenshot: a benchmark scene for the trained adapter
        Image.open(os.environ["M2IST_DEMO_IMAGE"]).convert("RGB").save(image)
    else:
        SAMPLE_PHOTOS[4].image().save(image)
    port = free_port()
    log = open(root / "demo.log", "w")  # noqa: SIM115 - closed below, after the server stops
    server = subprocess.Popen([sys.executable, str(ROOT / "examples" / "demo.py"), "--adapter", shown,
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the demo did not start:\n{(root / 'demo.log').read_text()}") from None
                time.sleep(0.5)
        yield url, adapter, image
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def api_answer(served):
    _, adapter, image = served
    grounder = ReferringExpressionGrounder.from_pretrained(adapter, device="cpu")
    return {phrase: grounder(image, phrase) for phrase in ("the cup of coffee", "the spoon on the right", BROWSER_PHRASE)}


def test_the_demo_answers_through_gradio_client_as_the_api_does(served, api_answer):
    from gradio_client import Client, handle_file

    url, _, image = served
    client = Client(url, verbose=False)
    output, coordinates = client.predict(handle_file(str(image)), "the cup of coffee", api_name="/ground")
    expected = api_answer["the cup of coffee"]
    assert coordinates["box_xyxy_pixels"] == pytest.approx(expected.box, abs=0.051)
    assert coordinates["image_size"] == list(expected.image_size)
    assert Path(output).is_file()
    with pytest.raises(Exception, match="phrase is empty"):  # shown as an error; the server keeps running
        client.predict(handle_file(str(image)), "   ", api_name="/ground")
    again = client.predict(handle_file(str(image)), "the spoon on the right", api_name="/ground")[1]
    assert again["box_xyxy_pixels"] == pytest.approx(api_answer["the spoon on the right"].box, abs=0.051)


def test_the_demo_in_a_real_browser(served, api_answer, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_path, "Chromium and chromedriver are missing: run `bash scripts/install.sh test`"
    url, _, image = served
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
        upload.send_keys(str(image))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))
        box = driver.find_element(By.CSS_SELECTOR, "#phrase textarea")
        box.send_keys(BROWSER_PHRASE)
        driver.find_element(By.ID, "find").click()
        wait.until(lambda d: "box_xyxy_pixels" in d.find_element(By.ID, "coordinates").text)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#output-image img")))
        shown = driver.find_element(By.ID, "coordinates").text
        text = shown[shown.index("{"):] if "{" in shown else shown
        screenshot = Path(os.environ.get("M2IST_DEMO_SCREENSHOT") or tmp_path / "demo.png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
    numbers = _numbers_after(text, "box_xyxy_pixels", 4)
    assert numbers == pytest.approx(api_answer[BROWSER_PHRASE].box, abs=0.051), shown


def _numbers_after(text: str, key: str, count: int) -> list[float]:
    """The first ``count`` numbers after ``key`` in the page's rendering of the coordinates JSON."""
    import re

    tail = text[text.index(key) + len(key):]
    return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", tail)[:count]]
