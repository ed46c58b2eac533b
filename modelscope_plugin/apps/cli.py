"""``modelscope-seg``: segment images, evaluate, train, export, validate and publish model cards, serve a browser demo.

Exit codes: 0 success; 1 a failed input, model, card or upload (the message says which and why; with several
images, the others are still written); 2 a usage error (bad arguments, an unknown subcommand).
"""
import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from modelscope_plugin.errors import CommandError
from modelscope_plugin.inference.precision import APP_PRECISION, PRECISION_CHOICES
from modelscope_plugin.integration.pipeline import build_pipeline
from modelscope_plugin.model_dirs.classes import THING_IDS_HELP, thing_ids_option
from modelscope_plugin.ranks import join_torchrun_group, sum_over_ranks

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TASK_CHOICES = ("panoptic", "semantic", "instance")
PRECISION_HELP = ("fp32, bf16 (autocast; fast only where the CPU has AVX-512 BF16 / AMX, or on a GPU), fp16 (CUDA) or "
                  f"auto (bf16 where the device has native bf16 units, else fp32); default {APP_PRECISION}")
CLASSES_HELP = ("one class name per line, in class order, for a checkpoint that records none (a detectron2 .pkl of an "
                "unknown class set, a Hugging Face folder with placeholder labels, an EasyCV export without names)")


def expand_inputs(inputs: Sequence[str]) -> List[Path]:
    """Files as given, folders -> their images (sorted, not recursive), globs -> their matches; URLs are refused."""
    paths: List[Path] = []
    for item in inputs:
        if item.startswith(("http://", "https://")):
            raise CommandError(f"{item}: segment reads local files; download the image first")
        if glob.has_magic(item):
            matches = sorted(Path(match) for match in glob.glob(item, recursive=True) if Path(match).is_file())
            if not matches:
                raise CommandError(f"{item}: the pattern matches no file")
            paths += matches
        elif Path(item).is_dir():
            images = sorted(path for path in Path(item).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise CommandError(f"{item}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            paths += images
        else:
            paths.append(Path(item))  # a missing file is reported as that image's error
    return paths


def output_paths(image: Path, output: Path) -> Dict[str, Path]:
    stem = image.stem
    return {"overlay": output / f"{stem}_overlay.png", "json": output / f"{stem}.json",
            "masks": output / f"{stem}_masks"}


def check_outputs_free(images: Sequence[Path], output: Path, overwrite: bool) -> None:
    """Two inputs must not write the same files, and existing files are only replaced with --overwrite."""
    seen: Dict[str, Path] = {}
    for image in images:
        if image.stem in seen and seen[image.stem] != image:
            raise CommandError(f"{seen[image.stem]} and {image} would write the same outputs in {output}; "
                               "segment them into different --output folders")
        seen[image.stem] = image
    if overwrite:
        return
    existing = [str(path) for image in images for path in output_paths(image, output).values() if path.exists()]
    if existing:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise CommandError(f"outputs already exist: {shown}; pass --overwrite to replace them or --resume to segment "
                           "only the images without them (nothing was written)")


def make_output_folder(output: Path) -> None:
    """Creates ``output`` (parents included) and checks a file can be written there, before any model loads."""
    probe = output / f".modelscope-seg-write-check-{os.getpid()}"  # one per process: torchrun's ranks check at once
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as error:
        reason = "a file is in the way" if isinstance(error, (FileExistsError, NotADirectoryError)) else error.strerror
        raise CommandError(f"cannot write outputs to {output}: {reason} ({error})") from error


def write_outputs(image: Path, rgb, result: Dict[str, Any], output: Path, task: Optional[str], model: str) -> None:
    """Overlay PNG with legend, one 0/255 PNG per mask, and JSON (COCO RLE masks, labels, scores, boxes). The JSON is
    written last, under a temporary name renamed into place: it marks the image as done (``--resume``)."""
    import shutil

    from PIL import Image

    from modelscope_plugin import visualization

    paths = output_paths(image, output)
    visualization.draw_overlay(rgb, result).save(paths["overlay"])
    if paths["masks"].exists():
        shutil.rmtree(paths["masks"])  # only reached with --overwrite or --resume (check_outputs_free)
    paths["masks"].mkdir()
    document = visualization.segments_to_json(result)
    for index, (mask, segment) in enumerate(zip(result["masks"], document["segments"])):
        mask_path = paths["masks"] / f"{index:03d}.png"
        Image.fromarray(mask.astype("uint8") * 255).save(mask_path)
        segment["mask_png"] = str(mask_path.relative_to(output))
    height, width = rgb.shape[:2]
    document = {"image": str(image), "model": model, "task": task, "height": int(height), "width": int(width),
                **document}
    partial = paths["json"].with_name(paths["json"].name + ".partial")
    partial.write_text(json.dumps(document, indent=1))
    os.replace(partial, paths["json"])


def model_class_names(classes_file: Optional[str]) -> Optional[List[str]]:
    """``--classes FILE``: the model's class names, one per line in class order (for a checkpoint that records
    none), or None without the option."""
    if classes_file is None:
        return None
    from modelscope_plugin.data.layouts import read_class_names

    if not Path(classes_file).is_file():
        raise CommandError(f"--classes {classes_file}: no such file")
    return read_class_names(classes_file)


def shard(images: Sequence[Path], rank: int, world_size: int) -> List[Path]:
    """This rank's images: every ``world_size``-th from ``rank`` on, so each image is read by one rank only."""
    return list(images[rank::world_size])


def segment(arguments) -> int:
    """Segments the inputs; under ``torchrun`` each rank takes its share (``shard``) and rank 0 prints the total."""
    from PIL import Image
    from tqdm import tqdm

    from modelscope_plugin.errors import ImageInputError
    from modelscope_plugin.inference.preprocess import load_image

    images = expand_inputs(arguments.inputs)
    output = Path(arguments.output)
    check_outputs_free(images, output, arguments.overwrite or arguments.resume)
    make_output_folder(output)
    rank, world_size = join_torchrun_group()
    own_images = shard(images, rank, world_size)
    if arguments.resume:
        own_images = [image for image in own_images if not output_paths(image, output)["json"].is_file()]
    segmenter = build_pipeline(arguments.model, rank_device(arguments.device), model_class_names(arguments.classes),
                               arguments.thing_ids, arguments.precision)
    parameters = {name: value for name, value in (
        ("task", arguments.task), ("object_mask_threshold", arguments.object_mask_threshold),
        ("overlap_threshold", arguments.overlap_threshold), ("score_thr", arguments.score_threshold),
        ("max_per_image", arguments.max_per_image)) if value is not None}
    failures = 0
    progress = tqdm(total=len(own_images), desc=f"rank {rank} segmenting" if world_size > 1 else "segmenting",
                    unit="image", disable=arguments.quiet, file=sys.stderr, position=rank)
    for start in range(0, len(own_images), arguments.batch_size):
        decoded: Dict[Path, Any] = {}
        for image in own_images[start:start + arguments.batch_size]:
            try:
                decoded[image] = load_image(str(image))  # decoded once: the pipeline gets the pixels, the overlay too
            except ImageInputError as error:
                failures += 1
                print(f"error: {error}", file=sys.stderr)
                progress.update(1)
        results = segmenter([Image.fromarray(rgb) for rgb in decoded.values()], batch_size=arguments.batch_size,
                            on_error="return", **parameters) if decoded else []
        for (image, rgb), result in zip(decoded.items(), results):
            if "error" in result:
                failures += 1
                print(f"error: {image}: {result['error']['message']}", file=sys.stderr)
            else:
                write_outputs(image, rgb, result, output, arguments.task, arguments.model)
            progress.update(1)
    progress.close()
    skipped = len(shard(images, rank, world_size)) - len(own_images)
    totals = sum_over_ranks([len(own_images) - failures, failures, skipped])
    if rank == 0:
        done, failed, already = totals
        print(f"{done} of {len(images)} images segmented into {output}"
              + (f", {already} already done (--resume)" if arguments.resume else "")
              + (f", {failed} failed" if failed else ""))
    return EXIT_FAILED if failures else EXIT_OK


def rank_device(device: str) -> str:
    """A GPU device name without an index means this rank's own GPU (``LOCAL_RANK``) under ``torchrun``."""
    if device in ("gpu", "cuda") and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def evaluate(arguments) -> int:
    from modelscope_plugin.data import datasets
    from modelscope_plugin.evaluation import evaluate as run_evaluation
    from modelscope_plugin.evaluation.evaluate import annotation_categories

    output = Path(arguments.output)
    if (output / "metrics.json").exists() and not arguments.overwrite:
        raise CommandError(f"{output / 'metrics.json'} already exists; pass --overwrite to replace it")
    if arguments.data:
        if arguments.images or arguments.annotations or arguments.labels:
            raise CommandError("--data names the dataset folder: give it without --images / --annotations / --labels")
        return evaluate_dataset_folder(arguments, output)
    if not arguments.task or not arguments.images:
        raise CommandError("evaluate needs --data DIR (a dataset folder), or --task and --images")
    if arguments.task == "panoptic":
        if not arguments.panoptic_folder:
            raise CommandError("--task panoptic needs --panoptic-folder (the COCO panoptic PNGs)")
        rows, problems = datasets.read_coco_panoptic(arguments.annotations, arguments.panoptic_folder, arguments.images)
    elif arguments.task == "instance":
        rows, problems = datasets.read_coco_instances(arguments.annotations, arguments.images)
    else:
        if not (arguments.labels and arguments.num_classes):
            raise CommandError("--task semantic needs --labels (label PNG folder) and --num-classes")
        rows, problems = datasets.read_label_folders(arguments.images, arguments.labels, arguments.num_classes,
                                                     reduce_zero_label=not arguments.no_reduce_zero_label,
                                                     ignore_value=arguments.ignore_value)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    if not rows:
        raise CommandError("no readable rows in the dataset")
    # the dataset's own classes (COCO's only when the JSON lists COCO's)
    categories = annotation_categories(arguments.annotations) if arguments.annotations else None
    segmenter = build_pipeline(arguments.model, rank_device(arguments.device), model_class_names(arguments.classes),
                               arguments.thing_ids, arguments.precision)
    results = run_evaluation(segmenter, rows, arguments.task, output_dir=str(output), categories=categories,
                             annotation_file=arguments.annotations if arguments.task == "instance" else None,
                             progress=not arguments.quiet, limit=arguments.limit)
    summary = {key: value for key, value in results.items() if key != "per_class"}
    print(json.dumps(summary, indent=1, default=str))
    return EXIT_OK


def evaluate_dataset_folder(arguments, output: Path) -> int:
    """``evaluate --data DIR``: the held-out split of a dataset folder in a layout ``modelscope-seg train`` reads;
    the task follows the data unless ``--task``."""
    from modelscope_plugin.data.layouts import ROW_KIND_OF_FORMAT, detect_layout
    from modelscope_plugin.evaluation import evaluate as run_evaluation
    from modelscope_plugin.training.data import TASKS_OF_ROW_KIND

    reduce_zero_label = False if arguments.no_reduce_zero_label else None
    layout = detect_layout(arguments.data, arguments.format, val_split=arguments.val_split,
                           classes_file=arguments.classes, reduce_zero_label=reduce_zero_label,
                           ignore_value=arguments.ignore_value)
    split = layout.val
    if split is None:
        raise CommandError(f"{arguments.data}: {layout.format} data without a held-out split; name it with --val-split")
    task = arguments.task or layout.default_task
    supported, reason = TASKS_OF_ROW_KIND[ROW_KIND_OF_FORMAT[layout.format]]
    if task not in supported:
        raise CommandError(f"{arguments.data} ({layout.format}) cannot score the {task} task ({reason}); it can "
                           f"score: {', '.join(supported)}")
    rows = layout.instance_evaluation_rows(split) if task == "instance" else layout.rows(split)
    if not rows:
        raise CommandError(f"no readable rows in {arguments.data} split {split.name}")
    # COCO AP's ground truth: the split's instances JSON, else the rows' own annotations
    annotation_file = split.annotation_file if task == "instance" and layout.format == "coco-instances" else None
    if task == "instance" and layout.format == "coco-panoptic" and layout.instances_val_file is not None:
        annotation_file = layout.instances_val_file
    segmenter = build_pipeline(arguments.model, rank_device(arguments.device), model_class_names(arguments.classes),
                               arguments.thing_ids, arguments.precision)
    results = run_evaluation(segmenter, rows, task, output_dir=str(output), categories=layout.categories,
                             annotation_file=str(annotation_file) if annotation_file else None,
                             progress=not arguments.quiet, limit=arguments.limit)
    summary = {key: value for key, value in results.items() if key != "per_class"}
    print(json.dumps(summary, indent=1, default=str))
    return EXIT_OK


def export(arguments) -> int:
    """ONNX export with export.py; checked against the network with onnxruntime, then moved into place, so a failed
    export never replaces an existing file."""
    from modelscope_plugin.apps.export import check_onnx, export_onnx, is_task_conditioned, remove_onnx
    from modelscope_plugin.integration import hub
    from modelscope_plugin.model_dirs.load import load_model

    output = Path(arguments.output)
    if output.exists() and not arguments.overwrite:
        raise CommandError(f"{output} already exists; pass --overwrite to replace it (nothing was written)")
    model = hub.resolve_model_dir(arguments.model) if hub.is_supported_id(arguments.model) else arguments.model
    config, network = load_model(model, class_names=model_class_names(arguments.classes),
                                 thing_ids=arguments.thing_ids)
    task = None
    if is_task_conditioned(network):  # OneFormer: one task per graph, by default the model's own
        task = arguments.task or config.task
    elif arguments.task is not None:
        raise CommandError(f"--task {arguments.task}: {arguments.model} is a {type(network).__name__}, whose logits "
                           "do not depend on the task (--task is for OneFormer)")
    partial = output.parent / f".{output.name}.partial"
    remove_onnx(partial)  # a leftover of an interrupted export of this same file
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_onnx(network, partial, example_size=arguments.example_size, task=task)
        largest = (check_onnx(network, partial, sizes=(arguments.example_size or (640, 640), arguments.check_size))
                   if arguments.check else None)
    except Exception as error:  # the exporter and onnxruntime raise their own types (e.g. an unsupported node)
        remove_onnx(partial)
        raise CommandError(f"export of {arguments.model} failed: {type(error).__name__}: {error}") from error
    os.replace(partial, output)
    checked = (f"; onnxruntime agrees with the network to {largest:.2g} of the logit range"
               if largest is not None else "")
    print(f"wrote {output}{f' (task {task})' if task else ''}{checked}")
    return EXIT_OK


def card_validate(arguments) -> int:
    from modelscope_plugin.apps.cards import validate_card

    problems = validate_card(arguments.card, arguments.weights)
    for problem in problems:
        print(f"{arguments.card}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{arguments.card}: valid")
    return EXIT_FAILED if problems else EXIT_OK


def card_push(arguments) -> int:
    import tempfile

    from modelscope_plugin.apps.cards import publish_folder, push_card

    if arguments.dry_run:
        folder = publish_folder(arguments.card, arguments.weights, arguments.dry_run, arguments.model_id)
        print(f"wrote {folder}: {', '.join(sorted(path.name for path in folder.iterdir()))} (nothing uploaded)")
        return EXIT_OK
    with tempfile.TemporaryDirectory() as staging:
        url = push_card(arguments.card, arguments.weights, arguments.model_id, staging, private=not arguments.public)
    print(f"published {arguments.model_id}: {url}")
    return EXIT_OK


def train(finetune_arguments: Sequence[str]) -> int:
    """``modelscope-seg train ...``: the finetune script (``modelscope_plugin.training.finetune``), its options as
    is."""
    from modelscope_plugin.training.finetune import main as finetune_main

    try:
        finetune_main(list(finetune_arguments))
    except SystemExit as exit_request:  # its own --help and usage errors
        return int(exit_request.code or 0)
    return EXIT_OK


def serve(arguments) -> int:
    try:
        import gradio  # noqa: F401  (the optional [demo] extra)
    except ImportError:
        raise CommandError("the browser demo needs Gradio: pip install modelscope-plugin-seg[demo]") from None
    from modelscope_plugin.apps.browser_demo import serve as serve_app
    from modelscope_plugin.apps.demo import REPOSITORY, shipped_demo_models

    models = arguments.model or [str(directory) for directory, _ in shipped_demo_models().values()]
    if not models:
        raise CommandError("no --model given and no trained demo model in model_cards/demo")
    serve_app(models, host=arguments.host, port=arguments.port, device=arguments.device,
              class_names=model_class_names(arguments.classes), thing_ids=arguments.thing_ids,
              precision=arguments.precision,
              data_folder=Path(arguments.data) if arguments.data else REPOSITORY.parent / "shared" / "data")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from modelscope_plugin.data.layouts import FORMATS

    parser = argparse.ArgumentParser(prog="modelscope-seg", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    segment_parser = commands.add_parser(
        "segment", help="images, folders or globs -> overlays, mask PNGs and JSON (COCO RLE)",
        description="For each image IMAGE.ext writes OUTPUT/IMAGE_overlay.png (classes tinted, legend with scores), "
                    "OUTPUT/IMAGE_masks/NNN.png (one 0/255 mask per segment) and OUTPUT/IMAGE.json (labels, scores, "
                    "boxes, masks as COCO RLE). Existing outputs are never replaced without --overwrite.")
    segment_parser.add_argument("inputs", nargs="+", metavar="INPUT",
                                help="image files, folders of images, or glob patterns")
    segment_parser.add_argument("--model", required=True,
                                help="hub id (damo/... or iic/...), model directory, Hugging Face folder or checkpoint "
                                     "file (EasyCV export, FastInst release, detectron2 .pkl)")
    segment_parser.add_argument("--classes", metavar="FILE", help=CLASSES_HELP)
    segment_parser.add_argument("--thing-ids", type=thing_ids_option, metavar="I,J,...", help=THING_IDS_HELP)
    segment_parser.add_argument("--task", choices=TASK_CHOICES, help="default: the model's own task")
    segment_parser.add_argument("--object-mask-threshold", type=float,
                                help="panoptic: keep queries above this class score (0.8)")
    segment_parser.add_argument("--overlap-threshold", type=float,
                                help="panoptic: minimum visible share of a mask (0.8)")
    segment_parser.add_argument("--score-threshold", type=float,
                                help="instance: drop detections below this score (0.5)")
    segment_parser.add_argument("--max-per-image", type=int, help="instance: top-k detections (100)")
    segment_parser.add_argument("--device", default="cpu", help="cpu, gpu, cuda:0 ... (default cpu)")
    segment_parser.add_argument("--precision", choices=PRECISION_CHOICES, default=APP_PRECISION, help=PRECISION_HELP)
    segment_parser.add_argument("--batch-size", type=positive_int, default=1,
                                help="images per forward pass (default 1)")
    segment_parser.add_argument("--output", default="outputs/segment", help="output folder (default outputs/segment)")
    segment_parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    segment_parser.add_argument("--resume", action="store_true",
                                help="segment only the images whose JSON is missing; leave the others untouched")
    segment_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    segment_parser.set_defaults(handler=segment)

    evaluate_parser = commands.add_parser(
        "evaluate", help="PQ / COCO AP / mIoU of a model on a COCO-format or ADE20K-style dataset",
        description="Runs modelscope_plugin.evaluation.evaluate; writes OUTPUT/metrics.json and OUTPUT/per_class.txt.")
    evaluate_parser.add_argument("--model", required=True, help="hub id, model directory, HF folder or checkpoint file")
    evaluate_parser.add_argument("--classes", metavar="FILE", help=CLASSES_HELP)
    evaluate_parser.add_argument("--thing-ids", type=thing_ids_option, metavar="I,J,...", help=THING_IDS_HELP)
    evaluate_parser.add_argument("--device", default="cpu", help="cpu, gpu, cuda:0 ... (default cpu)")
    evaluate_parser.add_argument("--precision", choices=PRECISION_CHOICES, default=APP_PRECISION, help=PRECISION_HELP)
    evaluate_parser.add_argument("--data", metavar="DIR",
                                 help="a dataset folder in any layout `modelscope-seg train` reads: its held-out "
                                      "split is scored, the task follows the data (instead of --images ...)")
    evaluate_parser.add_argument("--format", choices=FORMATS, help="--data: force a layout (default: detected)")
    evaluate_parser.add_argument("--val-split", help="--data: the held-out split's name (default: as for train)")
    evaluate_parser.add_argument("--task", choices=TASK_CHOICES, help="required without --data")
    evaluate_parser.add_argument("--images", help="image folder (without --data)")
    evaluate_parser.add_argument("--annotations", help="COCO panoptic or instances JSON (panoptic, instance)")
    evaluate_parser.add_argument("--panoptic-folder", help="COCO panoptic PNG folder (panoptic)")
    evaluate_parser.add_argument("--labels", help="label PNG folder (semantic)")
    evaluate_parser.add_argument("--num-classes", type=positive_int, help="number of classes (semantic)")
    evaluate_parser.add_argument("--no-reduce-zero-label", action="store_true",
                                 help="semantic: label value v is class v, 0 included (PASCAL VOC, Cityscapes train "
                                      "ids; default: ADE20K's convention, 0 ignored and value v is class v - 1)")
    evaluate_parser.add_argument("--ignore-value", type=int, default=255,
                                 help="semantic: the ignored label value (default 255)")
    evaluate_parser.add_argument("--limit", type=positive_int, help="evaluate the first N images only")
    evaluate_parser.add_argument("--output", default="outputs/evaluate",
                                 help="output folder (default outputs/evaluate)")
    evaluate_parser.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json")
    evaluate_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate_parser.set_defaults(handler=evaluate)

    export_parser = commands.add_parser(
        "export", help="ONNX export (FastInst: dynamic size; Mask2Former, OneFormer, EoMT: one fixed size), checked "
                       "with onnxruntime",
        description="Writes the network (normalised, padded images -> class and mask logits) as ONNX, checks "
                    "onnxruntime's logits against the network, then moves the file into place. FastInst: dynamic "
                    "batch/height/width, checked at two sizes. Mask2Former: the graph takes (1, 3, H, W) at the "
                    "--example-size only (pad images to it), checked there; OneFormer likewise, for one task "
                    "(--task) baked into the graph. EoMT: its own square input size only. "
                    "Post-processing stays in Python.")
    export_parser.add_argument("--model", required=True, help="hub id, model directory, HF folder or checkpoint file")
    export_parser.add_argument("--classes", metavar="FILE", help=CLASSES_HELP)
    export_parser.add_argument("--thing-ids", type=thing_ids_option, metavar="I,J,...", help=THING_IDS_HELP)
    export_parser.add_argument("--output", required=True, help="the .onnx file to write")
    export_parser.add_argument("--example-size", type=padded_size, default=None, metavar="HxW",
                               help="input size traced (Mask2Former: the graph's fixed input size), "
                                    "multiples of 32 (default: EoMT's input size, else 640x640)")
    export_parser.add_argument("--check-size", type=padded_size, default=(480, 832), metavar="HxW",
                               help="a second input size the check runs at, for dynamic-size graphs (default 480x832)")
    export_parser.add_argument("--task", choices=TASK_CHOICES, default=None,
                               help="OneFormer: the task baked into the graph (default: the model's default task)")
    export_parser.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime check")
    export_parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export_parser.set_defaults(handler=export)

    card_parser = commands.add_parser("card", help="validate or publish a model card",
                                      description="Model cards: model_cards/<owner>/<name>/ with README.md and "
                                                  "configuration.json.")
    card_commands = card_parser.add_subparsers(dest="card_command", required=True, metavar="ACTION")
    validate_parser = card_commands.add_parser(
        "validate", help="check a card's front matter and configuration.json against what the plugin loads",
        description="Checks README front matter (tasks, frameworks, license, datasets, metrics), a python usage "
                    "example, configuration.json (framework, task, model and pipeline types this package registers, "
                    "plugins); with weights (--weights, or in the card folder) also builds and loads the model "
                    "strictly.")
    validate_parser.add_argument("card",
                                 help="card folder, e.g. model_cards/damo/cv_swinL_panoptic-segmentation_cocopan")
    validate_parser.add_argument("--weights", help="model directory with the weights to check as well")
    validate_parser.set_defaults(handler=card_validate)
    push_parser = card_commands.add_parser(
        "push", help="publish a card plus weights under your own namespace (HubApi, token in MODELSCOPE_API_TOKEN)",
        description="Publishes README.md, configuration.json (with this package in 'plugins') and the weight files "
                    "as MODEL_ID. Needs network and MODELSCOPE_API_TOKEN; --dry-run FOLDER writes the exact folder "
                    "instead (refusing an existing one). Loading it needs trust_remote_code=True, as for any plugin.")
    push_parser.add_argument("card", help="card folder")
    push_parser.add_argument("--weights", required=True, help="model directory with the weights (hub layout)")
    push_parser.add_argument("--model-id", required=True, help="<your namespace>/<name>")
    push_parser.add_argument("--public", action="store_true", help="create the repository public (default private)")
    push_parser.add_argument("--dry-run", metavar="FOLDER", help="write the upload folder here and upload nothing")
    push_parser.set_defaults(handler=card_push)

    # listed here for --help; main() hands everything after "train" to the finetune script's own parser
    commands.add_parser("train", help="finetune on a COCO panoptic / COCO instances / semantic-folders / PASCAL VOC / "
                        "Cityscapes dataset "
                        "(options: modelscope-seg train --help)",
                        add_help=False)

    serve_parser = commands.add_parser(
        "serve", help="browser demo (Gradio) on http://127.0.0.1:PORT",
        description="Serves a Gradio page: upload an image or use the webcam, choose model, task and thresholds, see "
                    "the overlay with a legend of labels and scores, the segments table and the JSON (also as a "
                    "download). Requests are queued and run one at a time; uploads are capped at 20 MB. Needs the "
                    "[demo] extra (Gradio). Ctrl-C stops.")
    serve_parser.add_argument("--model", action="append",
                              help="hub id, model directory, HF folder or checkpoint file (repeatable; default: "
                                   "the demo models in "
                                   "model_cards/demo)")
    serve_parser.add_argument("--classes", metavar="FILE", help=CLASSES_HELP + " (applies to every --model)")
    serve_parser.add_argument("--thing-ids", type=thing_ids_option, metavar="I,J,...",
                              help=THING_IDS_HELP + " (applies to every --model)")
    serve_parser.add_argument("--host", default="127.0.0.1",
                              help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it "
                                   "to the network)")
    serve_parser.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    serve_parser.add_argument("--device", default="cpu", help="cpu, gpu, cuda:0 ... (default cpu)")
    serve_parser.add_argument("--precision", choices=PRECISION_CHOICES, default=APP_PRECISION, help=PRECISION_HELP)
    serve_parser.add_argument("--data", help="folder of the example photos, as for `make demo` (default: shared/data "
                                             "beside the repository; missing photos are left out)")
    serve_parser.set_defaults(handler=serve)
    return parser


def padded_size(text: str):
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 640x640, not {text!r}") from None
    if height < 32 or width < 32 or height % 32 or width % 32:
        raise argparse.ArgumentTypeError(f"{text}: both sides must be positive multiples of 32")
    return height, width


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command; returns its exit code (``--help``: 0, usage errors: 2)."""
    from modelscope_plugin.errors import (
        USER_ERRORS,
        CardError,
        DatasetLayoutError,
        DatasetProblemsError,
        TrainingDataError,
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        command, run = "train", lambda: train(argv[1:])
    else:
        try:
            arguments = build_parser().parse_args(argv)
        except SystemExit as exit_request:  # argparse exits 0 for --help and 2 for usage errors
            return int(exit_request.code or 0)
        command, run = arguments.command, lambda: arguments.handler(arguments)
    try:
        return run()
    except (CommandError, CardError, *USER_ERRORS, FileExistsError, DatasetLayoutError, DatasetProblemsError,
            TrainingDataError) as error:
        print(f"modelscope-seg {command}: error: {error}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
