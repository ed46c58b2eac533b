"""``modelscope-seg serve``: the HTTP API, then the page end-to-end in headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/run): upload a shared/data image, check the overlay, the legend and the JSON download
against the pipeline's own result. The server listens on 127.0.0.1 and stops by itself."""
import base64
import io
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import SHARED_DATA
from modelscope.outputs import OutputKeys
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image

from modelscope_plugin import visualization
from modelscope_plugin.apps.server import DemoServer

IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def segmenter(tiny_model_dir):
    return pipeline(Tasks.image_segmentation, model=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    demo = DemoServer([str(tiny_model_dir)], port=0, timeout_s=600)  # stops by itself at the latest after 10 minutes
    thread = threading.Thread(target=demo.run, daemon=True)
    thread.start()
    yield demo
    demo.deadline = time.monotonic()  # the serve loop checks twice a second
    thread.join(timeout=10)
    assert not thread.is_alive()


def post(url: str, data: bytes, headers=None):
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_api_answers_and_refuses(server, segmenter):
    assert server.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(server.url, timeout=30) as response:
        page = response.read().decode()
    assert 'id="image"' in page and 'id="legend"' in page and str(server.models[0]) in page
    status, answer = post(server.url + "api/segment?model=0&task=panoptic", IMAGE.read_bytes())
    assert status == 200
    expected = segmenter(str(IMAGE), task="panoptic")
    assert [segment["label"] for segment in answer["result"]["segments"]] == expected[OutputKeys.LABELS]
    assert (answer["result"]["height"], answer["result"]["width"]) == Image.open(IMAGE).size[::-1]
    for query, body, code, reason in (("model=0", b"not an image", 400, "not a readable image"),
                                      ("model=5", IMAGE.read_bytes(), 400, "unknown model"),
                                      ("model=0&task=depth", IMAGE.read_bytes(), 400, "task must be one of")):
        status, answer = post(server.url + "api/segment?" + query, body)
        assert status == code and reason in answer["error"], (query, answer)
    status, answer = post(server.url + "api/segment?model=0", b"x", {"Content-Length": str(10 ** 9)})
    assert status == 413 and "exceeds" in answer["error"]


def test_server_stops_by_itself_after_max_requests(tiny_model_dir):
    demo = DemoServer([str(tiny_model_dir)], port=0, max_requests=1)
    thread = threading.Thread(target=demo.run, daemon=True)
    thread.start()
    urllib.request.urlopen(demo.url + "api/models", timeout=30).read()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_command_listens_on_localhost_and_stops_after_max_requests(tiny_model_dir):
    import socket

    from modelscope_plugin.apps.cli import main

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["serve", "--model", str(tiny_model_dir), "--port", str(port),
                                                                "--max-requests", "2"])), daemon=True)
    thread.start()
    for _ in range(100):
        try:
            page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            break
        except urllib.error.URLError:
            time.sleep(0.1)
    assert str(tiny_model_dir) in page
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/models", timeout=5).read())
    assert models["models"] == [str(tiny_model_dir)]
    thread.join(timeout=10)
    assert codes == [0]


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.downloads = downloads
    yield driver
    driver.quit()


def test_page_end_to_end_in_headless_chromium(server, segmenter, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url)
    browser.find_element(By.ID, "image").send_keys(str(IMAGE))
    Select(browser.find_element(By.ID, "model")).select_by_index(0)
    Select(browser.find_element(By.ID, "task")).select_by_value("panoptic")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 300).until(lambda driver: driver.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "status").text
    expected = segmenter(str(IMAGE), task="panoptic")

    # the overlay: the uploaded image at its own size, visibly tinted
    source = browser.find_element(By.ID, "overlay").get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).convert("RGB"))
    original = np.asarray(Image.open(IMAGE).convert("RGB"))
    assert overlay.shape == original.shape and np.abs(overlay.astype(int) - original).mean() > 5
    assert browser.find_element(By.ID, "overlay").is_displayed()

    # the legend: the pipeline's labels, in order, with their scores
    items = browser.find_elements(By.CSS_SELECTOR, "#legend li")
    assert [item.find_element(By.CLASS_NAME, "label").text for item in items] == expected[OutputKeys.LABELS]
    assert [float(item.get_attribute("data-score")) for item in items] == pytest.approx(expected[OutputKeys.SCORES])
    assert len(items) >= 2

    # the JSON download parses to the same segments
    browser.find_element(By.ID, "download").click()
    target = browser.downloads / "segments.json"
    for _ in range(100):
        if target.is_file() and target.stat().st_size > 0:
            break
        time.sleep(0.1)
    downloaded = json.loads(target.read_text())
    reference = visualization.segments_to_json(expected)["segments"]
    assert len(downloaded["segments"]) == len(reference)
    for segment, expected_segment in zip(downloaded["segments"], reference):
        assert segment["label"] == expected_segment["label"] and segment["rle"] == expected_segment["rle"]
        assert segment["score"] == pytest.approx(expected_segment["score"]) and segment["box"] == expected_segment["box"]
