"""``modelscope-seg serve``, the Gradio browser demo, with the shipped demo models.

The "Segment" handler against the pipeline's own result and with bad uploads; app.py; the command's one-line
failures (no Gradio, a port in use); then the command as a user runs it: the upload cap, concurrent API clients, and
the page end to end in headless Chromium (Debian's chromium and chromium-driver, installed by .ci/run): page load, an
upload, the overlay, the table and the JSON (shown and downloaded) against the pipeline, and a bad upload's message in
the page, all while another client holds an idle connection open. Only 127.0.0.1 listens; Ctrl-C stops the server.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import REPO, SHARED_DATA
from PIL import Image

from modelscope_plugin import visualization
from modelscope_plugin.apps.cli import main
from modelscope_plugin.apps.demo import shipped_demo_models
from modelscope_plugin.errors import CommandError

gr = pytest.importorskip("gradio", reason="the [demo] extra (make test installs it)")
from modelscope_plugin.apps import browser_demo  # noqa: E402  (needs gradio)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MASK2FORMER = str(shipped_demo_models()["mask2former_synthetic-shapes"][0])
FASTINST = str(shipped_demo_models()["fastinst_synthetic-shapes"][0])


@pytest.fixture(scope="module")
def pipelines():
    return browser_demo.load_pipelines([MASK2FORMER, FASTINST], device="cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A synthetic scene like those the demo models were trained on (several shapes, confidently found)."""
    scenes, _ = browser_demo.example_images(tmp_path_factory.mktemp("scenes"), None)
    return scenes[0]


@pytest.fixture
def not_an_image(tmp_path) -> Path:
    path = tmp_path / "holiday.png"
    path.write_text("these bytes are no image")
    return path


def expected_result(pipelines, model: str, image: Path, task: str):
    """What the page should show: the pipeline on the decoded image with the sliders' starting values."""
    config = pipelines[model].config
    return pipelines[model](Image.open(image).convert("RGB"), task=task,
                            object_mask_threshold=config.inference.object_mask_threshold,
                            overlap_threshold=config.inference.overlap_threshold,
                            filter_low_score=config.inference.filter_low_score,
                            score_thr=browser_demo.SCORE_THRESHOLD, max_per_image=config.inference.max_per_image)


def legend_names(result) -> List[str]:
    return [f"#{index} {label} {score:.2f}" for index, (label, score) in enumerate(zip(result["labels"], result["scores"]))]


def click_segment(pipelines, folder: Path, upload, model: str = MASK2FORMER, task: str = "panoptic"):
    """The handler with the model's own thresholds (the Mask2Former's for a model the demo does not serve)."""
    config = pipelines.get(model, pipelines[MASK2FORMER]).config
    return browser_demo.segment_upload(
        pipelines, folder, upload, model, task, config.inference.object_mask_threshold, config.inference.overlap_threshold,
        config.inference.filter_low_score, browser_demo.SCORE_THRESHOLD, config.inference.max_per_image)


@pytest.mark.parametrize("model, task", [(MASK2FORMER, "panoptic"), (MASK2FORMER, "semantic"), (FASTINST, "instance")],
                         ids=["mask2former-panoptic", "mask2former-semantic", "fastinst-instance"])
def test_segment_handler_shows_the_pipeline_result(pipelines, scene, tmp_path, model, task):
    overlay, table, document, json_path, summary = click_segment(
        pipelines, tmp_path, {"path": str(scene), "orig_name": "scene.png"}, model, task)
    expected = expected_result(pipelines, model, scene, task)
    assert len(expected["masks"]) >= 3
    base_image, annotations = overlay.value["image"], overlay.value["annotations"]
    assert Image.open(base_image["path"]).size == Image.open(scene).size
    assert [annotation["label"] for annotation in annotations] == legend_names(expected)
    assert sorted(overlay.color_map) == sorted(legend_names(expected))
    assert [row[1] for row in table] == expected["labels"]
    assert [row[2] for row in table] == pytest.approx(expected["scores"], abs=1e-3)
    assert [row[3] for row in table] == [int(mask.sum()) for mask in expected["masks"]]
    assert document["segments"] == visualization.segments_to_json(expected)["segments"]
    assert (document["image"], document["task"], document["height"], document["width"]) == ("scene.png", task, 256, 256)
    assert json.loads(Path(json_path).read_text()) == document and Path(json_path).name == "scene_segments.json"
    assert summary.startswith(f"**{len(expected['masks'])} segments** ({task})")


def test_large_images_are_shown_smaller_with_full_size_json(pipelines, scene, tmp_path):
    large = tmp_path / "large.png"
    Image.open(scene).resize((2048, 1536), Image.NEAREST).save(large)
    overlay, _, document, _, _ = click_segment(pipelines, tmp_path, {"path": str(large), "orig_name": "large.png"})
    assert Image.open(overlay.value["image"]["path"]).size == (browser_demo.DISPLAY_LONG_SIDE, 768)
    assert all(Image.open(annotation["image"]["path"]).size == (1024, 768) for annotation in overlay.value["annotations"])
    assert (document["height"], document["width"]) == (1536, 2048)
    assert document["segments"][0]["rle"]["size"] == [1536, 2048]


def test_bad_uploads_get_the_package_message(pipelines, not_an_image, tmp_path):
    with pytest.raises(gr.Error) as caught:
        click_segment(pipelines, tmp_path, {"path": str(not_an_image), "orig_name": "holiday.png"})
    message = caught.value.message
    assert "holiday.png is not a readable image" in message and str(not_an_image) not in message
    with pytest.raises(gr.Error, match="the thresholds must be numbers"):
        browser_demo.segment_upload(pipelines, tmp_path, {"path": str(not_an_image)}, MASK2FORMER, "panoptic", "high",
                                    0.8, True, 0.5, 100)
    for upload, model, task, reason in ((None, MASK2FORMER, "panoptic", "Upload an image"),
                                        ({"path": str(not_an_image)}, "elsewhere/model", "panoptic", "unknown model"),
                                        ({"path": str(not_an_image)}, MASK2FORMER, "depth", "task must be one of")):
        with pytest.raises(gr.Error, match=reason):
            click_segment(pipelines, tmp_path, upload, model, task)


def test_app_py_builds_the_demo_with_the_shipped_models():
    import runpy

    app = runpy.run_path(str(REPO / "app.py"))["demo"]  # not as __main__: built, not launched
    assert isinstance(app, gr.Blocks)
    choices = [component.choices for component in app.blocks.values() if isinstance(component, gr.Dropdown)]
    assert choices == [[("mask2former_synthetic-shapes", MASK2FORMER), ("fastinst_synthetic-shapes", FASTINST)]]


def test_serve_without_gradio_fails_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["serve", "--model", MASK2FORMER]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pip install modelscope-plugin-seg[demo]" in error


def test_serve_on_a_port_in_use_fails_with_one_line_before_the_models_load(capsys, monkeypatch):
    built = []
    monkeypatch.setattr(browser_demo, "build_pipeline", lambda *arguments: built.append(arguments))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", MASK2FORMER, "--port", str(port)]) == 1
    error = capsys.readouterr().err
    assert error == f"modelscope-seg serve: error: cannot listen on 127.0.0.1:{port}: Address already in use; " \
                    "choose another --port (0 picks a free one)\n"
    assert built == []  # the port is checked before any model loads


def test_serve_builds_every_pipeline_with_the_precision_asked_for(monkeypatch, capsys):
    built = []

    def build_pipeline(*arguments):
        built.append(arguments)
        raise CommandError("stop here")

    monkeypatch.setattr(browser_demo, "build_pipeline", build_pipeline)
    assert main(["serve", "--model", MASK2FORMER, "--port", "0", "--precision", "auto"]) == 1
    assert "stop here" in capsys.readouterr().err
    assert [arguments[-1] for arguments in built] == ["auto"]


def listening_addresses(pid: int) -> List[Tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on, from /proc."""
    inodes = set()
    for descriptor in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    addresses = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: LISTEN
                address_hex, port_hex = local_address.split(":")
                raw = bytes.fromhex(address_hex)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[start:start + 4][::-1] for start in range(0, len(raw), 4))
                family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
                addresses.append((socket.inet_ntop(family, raw), int(port_hex, 16)))
    return addresses


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``modelscope-seg serve`` with both demo models in a subprocess, as a user runs it; stopped with Ctrl-C."""
    folder = tmp_path_factory.mktemp("serve")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False",
                       GRADIO_TEMP_DIR=str(folder / "gradio"), HF_HUB_OFFLINE="1")
    log = open(folder / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "modelscope_plugin.apps.cli", "serve", "--model", MASK2FORMER,
                                "--model", FASTINST, "--port", str(port), "--data", str(SHARED_DATA)],
                               stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, (folder / "serve.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "serve did not answer within 300 s"
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    process.url, process.port, process.log = url, port, folder / "serve.log"
    yield process
    process.send_signal(signal.SIGINT)
    try:
        assert process.wait(timeout=30) == 0, process.log.read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


@pytest.fixture
def idle_connection(served):
    """Another client: connected, half a request sent, then silent for the whole test."""
    connection = socket.create_connection(("127.0.0.1", served.port), timeout=5)
    connection.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    yield connection
    connection.close()


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
                 "--disable-dev-shm-usage", "--window-size=1400,1800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.downloads = tmp_path / "downloads"
    driver.downloads.mkdir()
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(driver.downloads)})
    yield driver
    driver.quit()


def raw_request(port: int, request: bytes) -> str:
    """The status line the server answers ``request`` with."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(request)
        return connection.makefile("rb").readline().decode().strip()


def test_uploads_are_capped(served):
    boundary = "upload-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"large.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + bytes(21 * 2 ** 20) + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(served.url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and b"maximum allowed size of 20971520 bytes" in refused.value.read()
    negative_length = b"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n"
    assert raw_request(served.port, negative_length).startswith("HTTP/1.1 400")


def assert_same_segments(served, expected):
    """The server is another process: its scores agree with this one's up to float rounding (oneDNN's threading),
    everything else exactly."""
    expected = json.loads(json.dumps(expected))
    assert [{**segment, "score": None} for segment in served] == [{**segment, "score": None} for segment in expected]
    assert [segment["score"] for segment in served] == pytest.approx([segment["score"] for segment in expected],
                                                                     abs=1e-5)


def test_concurrent_clients_are_queued_and_all_answered(served, pipelines, scene):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    config = pipelines[FASTINST].config
    arguments = (handle_file(str(scene)), FASTINST, "instance", config.inference.object_mask_threshold,
                 config.inference.overlap_threshold, config.inference.filter_low_score, browser_demo.SCORE_THRESHOLD,
                 config.inference.max_per_image)
    clients = [Client(served.url, verbose=False) for _ in range(3)]
    with ThreadPoolExecutor(len(clients)) as pool:
        answers = list(pool.map(lambda client: client.predict(*arguments, api_name="/segment"), clients))
    expected = visualization.segments_to_json(expected_result(pipelines, FASTINST, scene, "instance"))["segments"]
    for _, _, document, _, _ in answers:
        assert_same_segments(document["segments"], expected)


def test_page_end_to_end_in_headless_chromium(served, idle_connection, browser, pipelines, scene, not_an_image):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # idle_connection is open from here on: everything below is served while another client says nothing
    assert listening_addresses(served.pid) == [("127.0.0.1", served.port)]
    wait = WebDriverWait(browser, 120)
    browser.get(served.url)
    upload = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
    upload.send_keys(str(scene))
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#image img"))
    browser.find_element(By.ID, "run").click()
    wait.until(lambda driver: "segments" in driver.find_element(By.ID, "summary").text)
    expected = expected_result(pipelines, MASK2FORMER, scene, "panoptic")
    assert browser.find_element(By.ID, "summary").text.startswith(f"{len(expected['masks'])} segments (panoptic)")

    # the overlay: the image at its own size, one mask per segment, the legend's labels and scores
    base_image = browser.find_element(By.CSS_SELECTOR, "#overlay img.base-image")
    with urllib.request.urlopen(base_image.get_attribute("src"), timeout=30) as response:
        assert Image.open(response).size == Image.open(scene).size
    assert len(browser.find_elements(By.CSS_SELECTOR, "#overlay img.mask")) == len(expected["masks"])
    legend = [item.text for item in browser.find_elements(By.CSS_SELECTOR, "#overlay .legend-item")]
    assert legend == legend_names(expected)

    # the table: one row per segment
    labels = browser.find_elements(By.CSS_SELECTOR, "#segments [role=gridcell][data-col='1']")
    assert [label.text for label in labels] == expected["labels"]

    # the JSON, shown and downloaded, holds the pipeline's segments
    shown = "".join(browser.find_element(By.ID, "json").text.split())  # the viewer puts each token on a line
    assert f'"image":"{scene.name}"' in shown and '"task":"panoptic"' in shown
    browser.find_element(By.CSS_SELECTOR, "#json-file a").click()
    downloaded = browser.downloads / f"{scene.stem}_segments.json"
    wait.until(lambda driver: downloaded.is_file() and downloaded.stat().st_size > 0)
    document = json.loads(downloaded.read_text())
    assert_same_segments(document["segments"], visualization.segments_to_json(expected)["segments"])

    # a bad upload: the package's message in the page
    browser.find_element(By.CSS_SELECTOR, "#image button[aria-label='Remove Image']").click()
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(not_an_image))
    time.sleep(1)
    browser.find_element(By.ID, "run").click()
    toast = wait.until(lambda driver: " ".join(element.text for element in driver.find_elements(
        By.CSS_SELECTOR, "[data-testid='toast-body']")).strip())
    assert "holiday.png is not a readable image" in toast
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert "Traceback" not in served.log.read_text()  # the server's console too
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
    assert resources and all(name.startswith((served.url, "data:", "blob:")) for name in resources)  # nothing external
