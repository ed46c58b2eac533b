"""``modelscope-seg serve``: a one-page browser demo in the ModelScope studio style, on the standard library.

Upload an image, choose the model and task, see the overlay with a legend of labels and per-segment scores, and
download the result as JSON (masks as COCO RLE). ``http.server`` is enough for a local demo and adds no dependency;
requests are served one at a time (the models are not shared between threads), bodies are capped at
``MAX_UPLOAD_BYTES``, and the server listens on 127.0.0.1 only.

Routes: ``GET /`` the page; ``GET /api/models`` the model list; ``POST /api/segment?model=<index>&task=<task>``
with the image file as the body -> ``{"overlay": <PNG data URL>, "result": <segments JSON>}``, or
``{"error": ...}`` with status 400 (bad image or parameters) / 413 (too large) / 500 (model failure).
"""
import base64
import html
import io
import json
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import parse_qs, urlparse

HOST = "127.0.0.1"
MAX_UPLOAD_BYTES = 20 * 2 ** 20
TASKS = ("panoptic", "semantic", "instance")

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>modelscope-seg demo</title>
<style>
 body {{ margin: 0; font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; background: #f5f6fa; color: #1f2329; }}
 header {{ background: #624aff; color: white; padding: 14px 24px; font-size: 18px; font-weight: 600; }}
 header span {{ font-weight: 400; opacity: .8; margin-left: 12px; font-size: 14px; }}
 main {{ display: flex; gap: 20px; padding: 20px 24px; align-items: flex-start; }}
 .card {{ background: white; border-radius: 8px; box-shadow: 0 1px 4px rgba(0,0,0,.08); padding: 16px; }}
 #controls {{ width: 300px; display: flex; flex-direction: column; gap: 12px; }}
 label {{ font-size: 13px; color: #646a73; display: flex; flex-direction: column; gap: 4px; }}
 select, input {{ font-size: 14px; padding: 6px; }}
 button {{ background: #624aff; color: white; border: 0; border-radius: 6px; padding: 10px; font-size: 15px; cursor: pointer; }}
 button:disabled {{ opacity: .5; }}
 #output {{ flex: 1; display: flex; gap: 20px; }}
 #overlay {{ max-width: 100%; display: none; border-radius: 4px; }}
 #legend {{ list-style: none; padding: 0; margin: 0; min-width: 220px; font-size: 14px; }}
 #legend li {{ display: flex; align-items: center; gap: 8px; padding: 3px 0; }}
 .swatch {{ width: 14px; height: 14px; border-radius: 3px; display: inline-block; }}
 .score {{ margin-left: auto; color: #646a73; font-variant-numeric: tabular-nums; }}
 #status {{ font-size: 13px; color: #646a73; min-height: 1em; }}
 #status.error {{ color: #d83931; }}
 #download {{ display: none; font-size: 14px; color: #624aff; }}
</style></head>
<body>
<header>Image segmentation<span>Mask2Former / FastInst on modelscope_plugin</span></header>
<main>
 <section id="controls" class="card">
  <label>Image <input type="file" id="image" accept="image/*"></label>
  <label>Model <select id="model">{model_options}</select></label>
  <label>Task <select id="task">{task_options}</select></label>
  <button id="run">Segment</button>
  <div id="status"></div>
  <a id="download" download="segments.json" href="#">Download JSON</a>
 </section>
 <section id="output" class="card">
  <div><img id="overlay" alt="overlay"></div>
  <ul id="legend"></ul>
 </section>
</main>
<script>
const status = document.getElementById("status");
document.getElementById("run").addEventListener("click", async () => {{
  const file = document.getElementById("image").files[0];
  if (!file) {{ status.textContent = "Choose an image first."; status.className = "error"; return; }}
  const button = document.getElementById("run");
  button.disabled = true; status.textContent = "Segmenting…"; status.className = "";
  const query = new URLSearchParams({{model: document.getElementById("model").value, task: document.getElementById("task").value}});
  try {{
    const response = await fetch("/api/segment?" + query, {{method: "POST", body: file}});
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error);
    const overlay = document.getElementById("overlay");
    overlay.src = answer.overlay; overlay.style.display = "block";
    const legend = document.getElementById("legend");
    legend.replaceChildren();
    for (const segment of answer.result.segments) {{
      const item = document.createElement("li");
      item.dataset.label = segment.label; item.dataset.score = segment.score;
      const swatch = document.createElement("span");
      swatch.className = "swatch"; swatch.style.background = "rgb(" + segment.color.join(",") + ")";
      const name = document.createElement("span"); name.className = "label"; name.textContent = segment.label;
      const score = document.createElement("span"); score.className = "score"; score.textContent = segment.score.toFixed(3);
      item.append(swatch, name, score); legend.append(item);
    }}
    const download = document.getElementById("download");
    download.href = URL.createObjectURL(new Blob([JSON.stringify(answer.result, null, 1)], {{type: "application/json"}}));
    download.style.display = "inline";
    status.textContent = answer.result.segments.length + " segments (" + answer.result.task + ")";
    document.body.dataset.state = "done";
  }} catch (error) {{
    status.textContent = error.message; status.className = "error"; document.body.dataset.state = "error";
  }} finally {{ button.disabled = false; }}
}});
</script>
</body></html>
"""


class DemoServer(HTTPServer):
    """Holds the model list and lazily built pipelines; stops after ``max_requests`` or ``deadline`` if given."""

    def __init__(self, models: Sequence[str], port: int = 0, device: str = "cpu", max_requests: Optional[int] = None,
                 timeout_s: Optional[float] = None):
        super().__init__((HOST, port), DemoRequestHandler)
        self.models = list(models)
        self.device = device
        self.pipelines: Dict[int, Any] = {}
        self.requests_left = max_requests
        self.deadline = time.monotonic() + timeout_s if timeout_s else None
        self.timeout = 0.5  # handle_request wakes up this often to check the deadline

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def pipeline_for(self, index: int):
        if index not in self.pipelines:
            from modelscope_plugin.integration.pipeline import build_pipeline

            self.pipelines[index] = build_pipeline(self.models[index], self.device)
        return self.pipelines[index]

    def should_stop(self) -> bool:
        return (self.requests_left is not None and self.requests_left <= 0) or \
               (self.deadline is not None and time.monotonic() > self.deadline)

    def run(self) -> None:
        """Serves until a limit is reached (or forever without limits)."""
        while not self.should_stop():
            self.handle_request()
        self.server_close()


def segment_image(segmenter, data: bytes, task: str, model: str, file_name: str = "upload") -> Dict[str, Any]:
    """Image bytes -> overlay PNG data URL and the result document (``visualization.segments_to_json`` + colours)."""
    from PIL import Image

    from modelscope_plugin import visualization
    from modelscope_plugin.errors import ImageInputError
    from modelscope_plugin.inference.preprocess import load_image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:  # PIL raises several unrelated types for undecodable bytes
        raise ImageInputError(f"uploaded file {file_name} is not a readable image: {error}") from error
    rgb = load_image(image)
    result = segmenter(image, task=task)
    overlay = visualization.draw_overlay(rgb, result, legend=False)
    buffer = io.BytesIO()
    overlay.save(buffer, format="PNG")
    document = visualization.segments_to_json(result)
    for segment in document["segments"]:
        segment["color"] = [int(value) for value in visualization.class_color(segment["label_id"])]
    document = {"image": file_name, "model": model, "task": task, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                **document}
    return {"overlay": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), "result": document}


class DemoRequestHandler(BaseHTTPRequestHandler):
    server: DemoServer

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"serve: {format % args}\n")

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status: int, value: Any) -> None:
        self.send_body(status, json.dumps(value).encode("utf-8"), "application/json")

    def count_request(self) -> None:
        if self.server.requests_left is not None:
            self.server.requests_left -= 1

    def do_GET(self) -> None:
        self.count_request()
        path = urlparse(self.path).path
        if path == "/":
            model_options = "".join(f'<option value="{index}">{html.escape(model)}</option>' for index, model in enumerate(self.server.models))
            task_options = '<option value="">model default</option>' + "".join(f'<option value="{task}">{task}</option>' for task in TASKS)
            page = PAGE.format(model_options=model_options, task_options=task_options)
            self.send_body(HTTPStatus.OK, page.encode("utf-8"), "text/html; charset=utf-8")
        elif path == "/api/models":
            self.send_json(HTTPStatus.OK, {"models": self.server.models, "tasks": list(TASKS)})
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no page {path}"})

    def do_POST(self) -> None:
        self.count_request()
        url = urlparse(self.path)
        if url.path != "/api/segment":
            return self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {url.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_UPLOAD_BYTES:
            return self.send_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  {"error": f"upload of {length} bytes exceeds {MAX_UPLOAD_BYTES} bytes"})
        query = parse_qs(url.query)
        try:
            index = int(query.get("model", ["0"])[0])
            model = self.server.models[index]
        except (ValueError, IndexError):
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": f"unknown model {query.get('model')}"})
        task = query.get("task", [""])[0] or None
        if task is not None and task not in TASKS:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": f"task must be one of {TASKS}, not {task!r}"})
        data = self.rfile.read(length)
        from modelscope_plugin.errors import USER_ERRORS, CommandError, ImageInputError

        try:
            segmenter = self.server.pipeline_for(index)
            answer = segment_image(segmenter, data, task or segmenter.config.task, model)
        except ImageInputError as error:
            return self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except (CommandError, *USER_ERRORS) as error:
            return self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(error)})
        self.send_json(HTTPStatus.OK, answer)


def serve_forever(models: List[str], port: int = 7860, device: str = "cpu", max_requests: Optional[int] = None) -> None:
    server = DemoServer(models, port=port, device=device, max_requests=max_requests)
    print(f"serving {', '.join(models)} on {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        server.server_close()
