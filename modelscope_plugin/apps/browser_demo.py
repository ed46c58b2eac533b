"""``modelscope-seg serve``: the browser demo, a Gradio app (the framework ModelScope studios and Hugging Face
Spaces run).

Upload an image (or take one with the webcam), choose the model, the task and the thresholds (the pipeline's call
parameters), and see the overlay with a legend of labels and scores, a table of the segments, and the result as
JSON (masks as COCO RLE), shown and as a download. Examples: synthetic scenes like those the demo models were
trained on, and sample photos. Events are queued and run one at a time (the pipelines are not shared between
threads), uploads are capped at ``MAX_FILE_SIZE``, and the server listens on 127.0.0.1 unless given another
address. Gradio is the optional ``[demo]`` extra; ``app.py`` at the repository root runs this app as a studio does.
"""
import json
import socket
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import gradio as gr
import numpy as np
from PIL import Image

from modelscope_plugin import visualization
from modelscope_plugin.apps.demo import SAMPLES, demo_scenes
from modelscope_plugin.errors import USER_ERRORS, CommandError
from modelscope_plugin.inference.precision import APP_PRECISION
from modelscope_plugin.inference.preprocess import load_image
from modelscope_plugin.integration.pipeline import build_pipeline

HOST = "127.0.0.1"
PORT = 7860
MAX_FILE_SIZE = "20mb"
MAX_QUEUED = 16
"""Requests beyond this many waiting are refused ("queue full") rather than queued."""
DISPLAY_LONG_SIDE = 1024
"""The overlay is shown at most this many pixels long (masks resized by nearest neighbour); the JSON keeps full size."""
MASK_OPACITY = 0.6
TASKS = ("panoptic", "semantic", "instance")
SCENE_FOLDER = Path(tempfile.gettempdir()) / "modelscope-seg-serve-scenes"
"""Where the example scenes are written (once, then reused)."""
TABLE_HEADERS = ["#", "label", "score", "area (px)", "box (x1, y1, x2, y2)"]
SCORE_THRESHOLD = 0.5
"""The pipeline's default ``score_thr``."""
DESCRIPTION = """# Image segmentation
Mask2Former (panoptic, semantic, instance) and FastInst (instance) running on `modelscope_plugin`. Upload an image or
pick an example, choose the model, the task and the thresholds, then **Segment**. The shipped demo models were trained
on synthetic shapes only: on photos their labels name shapes and textures, not objects."""


def load_pipelines(models: Sequence[str], device: str, class_names: Optional[Sequence[str]] = None,
                   thing_ids: Optional[Sequence[int]] = None, precision: str = APP_PRECISION) -> Dict[str, Any]:
    """model (hub id, directory, Hugging Face folder or checkpoint file) -> its pipeline, all built before serving, so
    that a bad model fails at start. ``class_names``, ``thing_ids``: for checkpoints that record none; ``precision``:
    the pipelines' (precision.py)."""
    return {model: build_pipeline(model, device, class_names, thing_ids, precision) for model in models}


def example_images(scene_folder: Path, data_folder: Optional[Path]) -> Tuple[List[Path], List[Path]]:
    """The demo's synthetic scenes (written once under ``scene_folder``) and the sample photos in ``data_folder``."""
    scenes = sorted(demo_scenes(scene_folder).image_folder.glob("*.png"))
    photos = [data_folder / relative for relative in SAMPLES] if data_folder is not None else []
    return scenes, [photo for photo in photos if photo.is_file()]


def model_name(model: str) -> str:
    """A hub id as it is, a model directory or checkpoint file by its name."""
    path = Path(model)
    return path.name if path.exists() else model


def overlay_value(rgb: np.ndarray, result: Dict[str, Any]) -> gr.AnnotatedImage:
    """The image with one tinted mask per segment in its class colour, legend entries "#index label score"; at most
    ``DISPLAY_LONG_SIDE`` pixels long."""
    height, width = rgb.shape[:2]
    scale = min(1.0, DISPLAY_LONG_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(rgb)
    if scale < 1:
        image = image.resize(size, Image.BILINEAR)
    annotations, colors = [], {}
    for index, (mask, label, label_id, score) in enumerate(
            zip(result["masks"], result["labels"], result["label_ids"], result["scores"])):
        if scale < 1:
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
        name = f"#{index} {label} {score:.2f}"
        annotations.append((mask.astype(np.float32) * MASK_OPACITY, name))
        colors[name] = "#{:02x}{:02x}{:02x}".format(*visualization.class_color(label_id))
    return gr.AnnotatedImage(value=(np.asarray(image), annotations), color_map=colors)


def segments_table(result: Dict[str, Any]) -> List[List[Any]]:
    """One row per segment: index, label, score, area in pixels, box."""
    return [[index, label, round(float(score), 3), int(mask.sum()), ", ".join(f"{value:g}" for value in box)]
            for index, (label, score, mask, box) in enumerate(
                zip(result["labels"], result["scores"], result["masks"], result["boxes"]))]


def segment_upload(pipelines: Dict[str, Any], output_folder: Path, upload: Optional[Dict[str, Any]], model: str,
                   task: str, object_mask_threshold: float, overlap_threshold: float, filter_low_score: bool,
                   score_threshold: float, max_per_image: float):
    """One click on "Segment". ``upload`` is the file as Gradio received it, not decoded by Gradio: ``load_image``
    reads it, so a bad file gets the package's own message. Returns the overlay, the table, the JSON document, the
    JSON file and a summary line; the package's errors become ``gr.Error`` (a message in the page, no traceback)."""
    if not upload or not upload.get("path"):
        raise gr.Error("Upload an image, take one with the webcam, or pick an example first.", print_exception=False)
    if model not in pipelines:
        raise gr.Error(f"unknown model {model!r}; this demo serves {', '.join(pipelines)}", print_exception=False)
    if task not in TASKS:
        raise gr.Error(f"task must be one of {', '.join(TASKS)}, not {task!r}", print_exception=False)
    try:  # the sliders send numbers; a client of the API may send anything
        parameters = dict(task=task, object_mask_threshold=float(object_mask_threshold),
                          overlap_threshold=float(overlap_threshold), filter_low_score=bool(filter_low_score),
                          score_thr=float(score_threshold), max_per_image=int(max_per_image))
    except (TypeError, ValueError) as error:
        raise gr.Error(f"the thresholds must be numbers: {error}", print_exception=False) from error
    path = upload["path"]
    file_name = upload.get("orig_name") or Path(path).name
    started = time.perf_counter()
    try:
        rgb = load_image(path)
        result = pipelines[model](Image.fromarray(rgb), **parameters)
    except USER_ERRORS as error:
        # the name the user knows, not the path of Gradio's copy; the console stays free of tracebacks
        raise gr.Error(str(error).replace(path, file_name), print_exception=False) from error
    seconds = time.perf_counter() - started
    document = {"image": file_name, "model": model, "task": task, "height": int(rgb.shape[0]),
                "width": int(rgb.shape[1]), **visualization.segments_to_json(result)}
    json_path = Path(tempfile.mkdtemp(dir=output_folder)) / f"{Path(file_name).stem}_segments.json"
    json_path.write_text(json.dumps(document, indent=1))
    summary = (f"**{len(result['masks'])} segments** ({task}) from {model_name(model)} on {file_name}, "
               f"{rgb.shape[1]}x{rgb.shape[0]} pixels, in {seconds:.1f} s")
    return overlay_value(rgb, result), segments_table(result), document, str(json_path), summary


def model_settings(pipelines: Dict[str, Any], model: str):
    """The chosen model's own task and thresholds, for the task choice and the sliders."""
    config = pipelines[model].config
    return (gr.Radio(value=config.task), gr.Slider(value=config.inference.object_mask_threshold),
            gr.Slider(value=config.inference.overlap_threshold), gr.Checkbox(value=config.inference.filter_low_score),
            gr.Slider(value=config.inference.max_per_image))


def task_settings(task: str):
    """Panoptic thresholds for the panoptic task, instance thresholds for the instance task, none for semantic."""
    return gr.Column(visible=task == "panoptic"), gr.Column(visible=task == "instance")


def build_app(pipelines: Dict[str, Any], scenes: Sequence[Path] = (), photos: Sequence[Path] = (),
              output_folder: Optional[Path] = None) -> gr.Blocks:
    """The page for ``pipelines`` (model -> pipeline, the first one chosen at start) with ``scenes`` and ``photos``
    as examples; JSON downloads are written under ``output_folder`` (default: a new temporary folder)."""
    output_folder = Path(tempfile.mkdtemp(prefix="modelscope-seg-serve-")) if output_folder is None else output_folder
    first_model = next(iter(pipelines))
    config = pipelines[first_model].config
    # uploads and results in Gradio's cache are deleted an hour after they were written (checked every 10 minutes)
    with gr.Blocks(title="modelscope-seg demo", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown(DESCRIPTION)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(label="Image", sources=["upload", "webcam", "clipboard"], type="filepath",
                                 elem_id="image")
                model = gr.Dropdown([(model_name(name), name) for name in pipelines], value=first_model, label="Model",
                                    elem_id="model")
                task = gr.Radio(list(TASKS), value=config.task, label="Task", elem_id="task")
                with gr.Accordion("Thresholds", open=True):
                    with gr.Column(visible=config.task == "panoptic") as panoptic_settings:
                        object_mask_threshold = gr.Slider(
                            0, 1, value=config.inference.object_mask_threshold, step=0.01,
                            label="object_mask_threshold",
                            info="keep a query whose best class probability exceeds this")
                        overlap_threshold = gr.Slider(
                            0, 1, value=config.inference.overlap_threshold, step=0.01, label="overlap_threshold",
                            info="drop a segment left with less than this share of its own mask")
                        filter_low_score = gr.Checkbox(
                            value=config.inference.filter_low_score, label="filter_low_score",
                            info="a segment keeps only pixels where its mask probability is at least 0.5")
                    with gr.Column(visible=config.task == "instance") as instance_settings:
                        score_threshold = gr.Slider(0, 1, value=SCORE_THRESHOLD, step=0.01, label="score_thr",
                                                    info="drop detections scoring below this")
                        max_per_image = gr.Slider(1, 200, value=config.inference.max_per_image, step=1,
                                                  label="max_per_image", info="top-k detections before thresholding")
                run = gr.Button("Segment", variant="primary", elem_id="run")
                if scenes:
                    gr.Examples([[str(path)] for path in scenes], inputs=[image],
                                label="Synthetic scenes (what the demo models were trained on)")
                if photos:
                    gr.Examples([[str(path)] for path in photos], inputs=[image], label="Photos")
            with gr.Column(scale=3):
                summary = gr.Markdown(elem_id="summary")
                overlay = gr.AnnotatedImage(label="Overlay (hover a legend entry to highlight its segment)",
                                            elem_id="overlay")
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Segments", interactive=False, elem_id="segments")
                json_file = gr.File(label="Download JSON", interactive=False, elem_id="json-file")
                document = gr.JSON(label="JSON (masks as COCO RLE)", open=True, max_height=400, elem_id="json")

        # page-only updates: answered at once, not queued behind segmentations, not part of the API
        model.change(partial(model_settings, pipelines), inputs=[model],
                     outputs=[task, object_mask_threshold, overlap_threshold, filter_low_score, max_per_image],
                     queue=False, api_visibility="private")
        task.change(task_settings, inputs=[task], outputs=[panoptic_settings, instance_settings], queue=False,
                    api_visibility="private")
        # preprocess=False: the function gets the uploaded file's path and the controls' values as sent
        run.click(partial(segment_upload, pipelines, output_folder),
                  inputs=[image, model, task, object_mask_threshold, overlap_threshold, filter_low_score,
                          score_threshold, max_per_image],
                  outputs=[overlay, table, document, json_file, summary], preprocess=False, api_name="segment")
    return app


def available_port(host: str, port: int) -> int:
    """``port`` if it is free on ``host`` (0: a free one); otherwise a ``CommandError`` naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise CommandError(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                               "choose another --port (0 picks a free one)") from None
        return probe.getsockname()[1]


def launch(app: gr.Blocks, host: str = HOST, port: int = PORT) -> None:
    """Starts serving ``app`` on ``host:port`` and returns (``app.close()`` stops it): one event at a time, at most
    ``MAX_QUEUED`` waiting, uploads capped at ``MAX_FILE_SIZE``, errors shown in the page; no share link, telemetry
    or monitoring page."""
    app.queue(default_concurrency_limit=1, max_size=MAX_QUEUED)
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True,
               max_file_size=MAX_FILE_SIZE, prevent_thread_lock=True, ssr_mode=False, mcp_server=False,
               enable_monitoring=False, run_history=False, footer_links=["api", "gradio", "settings"],
               theme=gr.themes.Default(primary_hue="violet"))


def serve(models: Sequence[str], host: str = HOST, port: int = PORT, device: str = "cpu",
          data_folder: Optional[Path] = None, scene_folder: Path = SCENE_FOLDER,
          class_names: Optional[Sequence[str]] = None, thing_ids: Optional[Sequence[int]] = None,
          precision: str = APP_PRECISION) -> None:
    """``modelscope-seg serve``: checks the address, builds every pipeline, writes the example scenes, then serves
    until Ctrl-C."""
    port = available_port(host, port)
    pipelines = load_pipelines(models, device, class_names, thing_ids, precision)
    scenes, photos = example_images(scene_folder, data_folder)
    app = build_app(pipelines, scenes, photos)
    launch(app, host, port)
    print(f"serving {', '.join(models)} on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    app.block_thread()  # until Ctrl-C, then closes the server
