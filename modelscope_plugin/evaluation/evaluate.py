"""``evaluate``: run a pipeline over a dataset, stream each result into a metric, write metrics and exports.

Memory stays flat: each image's result is scored and dropped (instance AP keeps its detections as RLE for COCOeval).
Under ``torchrun`` (an initialised ``torch.distributed`` process group) rank r evaluates rows r, r + N, r + 2N, ...:
every image exactly once, no padding duplicates; the metric states are gathered and merged on every rank, and
rank 0 writes the files.
Outputs in ``output_dir``: ``metrics.json``, ``per_class.txt``; optionally ``coco_instances_results.json``
(COCO results, RLE + [x, y, w, h]) and ``panoptic/`` PNGs + ``panoptic_predictions.json`` (COCO panoptic format).
"""
import json
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from modelscope_plugin.config import TASKS
from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES, COCO_THING_CATEGORIES
from modelscope_plugin.evaluation.metrics import CocoInstanceMetric, PanopticQualityMetric, SemanticSegmentationMetric
from modelscope_plugin.evaluation.panoptic_quality import categories_as_dicts, id_to_rgb
from modelscope_plugin.ranks import gather_objects, merge_metrics, rank_and_world_size


def _as_predictor(model_or_pipeline: Any) -> Callable[[str], Mapping[str, Any]]:
    """A callable (pipeline or function: image path -> result dict), a model id / directory, or a ModelScope Model."""
    if isinstance(model_or_pipeline, str) or not callable(model_or_pipeline) or _is_modelscope_model(model_or_pipeline):
        from modelscope.pipelines import pipeline
        from modelscope.utils.constant import Tasks

        return pipeline(Tasks.image_segmentation, model=model_or_pipeline)
    return model_or_pipeline


def _is_modelscope_model(value: Any) -> bool:
    from modelscope.models.base import Model

    return isinstance(value, Model)


def _format_table(per_class: Mapping[str, Mapping[str, Any]]) -> str:
    if not per_class:
        return ""
    columns = [key for key in next(iter(per_class.values())).keys()]
    width = max(len(name) for name in per_class) + 2
    lines = ["class".ljust(width) + "".join(column.rjust(12) for column in columns)]
    for name, values in per_class.items():
        cells = []
        for column in columns:
            value = values[column]
            cells.append(("-" if value is None else f"{value:.4f}" if isinstance(value, float)
                          else str(value)).rjust(12))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines) + "\n"


def evaluate(model_or_pipeline: Any, dataset: Iterable[Mapping[str, Any]], task: str, output_dir: Optional[str] = None,
             categories: Optional[Sequence[Any]] = None, class_names: Optional[Sequence[str]] = None,
             annotation_file: Optional[str] = None, export_coco_results: bool = False, export_panoptic: bool = False,
             ignore_label: int = 255, progress: bool = True, limit: Optional[int] = None,
             pipeline_arguments: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Score ``model_or_pipeline`` on ``dataset`` rows (``modelscope_plugin.data`` readers, or their MsDataset).

    task: 'panoptic' (PQ), 'instance' (COCO segm + bbox AP), 'semantic' (mIoU). ``categories``: the class list of
    the dataset (default: those of ``annotation_file`` when given, else COCO panoptic's 133, or its 80 things for
    instance). ``pipeline_arguments``: keyword arguments of each call (default for a ModelScope pipeline
    ``{"task": task}``, plus ``score_thr=0`` for instance: AP ranks every detection, as COCO's evaluation does;
    none for a plain callable). Returns the metric dict.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if categories is None and annotation_file is not None:
        categories = annotation_categories(annotation_file)
    predictor = _as_predictor(model_or_pipeline)
    if pipeline_arguments is None:
        from modelscope.pipelines.base import Pipeline

        pipeline_arguments = {}
        if isinstance(predictor, Pipeline):
            pipeline_arguments = {"task": task, "score_thr": 0.0} if task == "instance" else {"task": task}
    if task == "panoptic":
        metric = PanopticQualityMetric(categories)
    elif task == "instance":
        metric = CocoInstanceMetric(annotation_file, categories or COCO_THING_CATEGORIES)
    else:
        metric = SemanticSegmentationMetric(class_names, categories, ignore_label)
    if (export_coco_results or export_panoptic) and output_dir is None:
        raise ValueError("exports need an output_dir")
    panoptic_folder = os.path.join(output_dir, "panoptic") if output_dir and export_panoptic else None
    if panoptic_folder:
        os.makedirs(panoptic_folder, exist_ok=True)
    panoptic_annotations: List[Tuple[int, Dict[str, Any]]] = []  # (row index, annotation)

    rank, world_size = rank_and_world_size()
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if total is not None and limit is not None:
        total = min(total, limit)
    if total is not None:
        total = len(range(rank, total, world_size))
    progress_bar = tqdm(total=total,
                        desc=f"evaluating {task}" + (f" (rank {rank}/{world_size})" if world_size > 1 else ""),
                        disable=not progress)
    for index, row in enumerate(dataset):
        if limit is not None and index >= limit:
            break
        if index % world_size != rank:
            continue
        row = dict(row)
        outputs = predictor(row["image_path"], **pipeline_arguments)
        metric.add(outputs, row)
        if panoptic_folder:
            panoptic_annotations.append((index, _write_panoptic_png(outputs, row, panoptic_folder)))
        del outputs
        progress_bar.update(1)
    progress_bar.close()

    if world_size > 1:
        (metric,) = merge_metrics([metric])
        panoptic_annotations = [entry for part in gather_objects(panoptic_annotations) for entry in part]
    panoptic_annotations = [annotation for _, annotation in sorted(panoptic_annotations, key=lambda entry: entry[0])]
    results = metric.evaluate()
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
            json.dump({"task": task, **results}, handle, indent=2)
        tables = {"": results.get("per_class", {})} if task != "instance" else {
            f"{iou_type} AP\n": {name: {"AP": value} for name, value in results[iou_type]["per_class"].items()}
            for iou_type in results}
        with open(os.path.join(output_dir, "per_class.txt"), "w") as handle:
            for title, table in tables.items():
                handle.write(title + _format_table(table))
        if export_coco_results and task == "instance":
            with open(os.path.join(output_dir, "coco_instances_results.json"), "w") as handle:
                json.dump(metric.accumulator.detections, handle)
        if panoptic_folder:
            category_list = categories_as_dicts(categories or COCO_PANOPTIC_CATEGORIES)
            with open(os.path.join(output_dir, "panoptic_predictions.json"), "w") as handle:
                json.dump({"annotations": panoptic_annotations,
                           "categories": [dict(c, isthing=int(c["isthing"])) for c in category_list]}, handle)
    return results


def annotation_categories(annotation_file: str) -> List[Dict[str, Any]]:
    """The ``categories`` of a COCO instances or panoptic JSON (``isthing`` defaults to 1, as in instances files)."""
    with open(annotation_file) as handle:
        categories = json.load(handle).get("categories")
    if not categories:
        raise ValueError(f"{annotation_file} has no 'categories' list")
    return categories_as_dicts(categories)


def _write_panoptic_png(outputs: Mapping[str, Any], row: Mapping[str, Any], folder: str) -> Dict[str, Any]:
    """COCO panoptic PNG (id -> RGB) for one result; returns its annotation (segments with pixels only)."""
    panoptic_seg = np.asarray(outputs["panoptic_seg"])
    file_name = os.path.splitext(row.get("file_name") or os.path.basename(row["image_path"]))[0] + ".png"
    Image.fromarray(id_to_rgb(panoptic_seg)).save(os.path.join(folder, file_name))
    ids, counts = np.unique(panoptic_seg, return_counts=True)
    area_of = dict(zip(ids.tolist(), counts.tolist()))
    segments = [{"id": int(s["id"]), "category_id": int(s["category_id"]), "iscrowd": 0,
                 "area": int(area_of[int(s["id"])]), "bbox": [int(v) for v in s.get("bbox", [0, 0, 0, 0])],
                 "score": float(s.get("score", 1.0))}
                for s in outputs["segments_info"] if area_of.get(int(s["id"]), 0) > 0]
    return {"image_id": row["image_id"], "file_name": file_name, "segments_info": segments}


def evaluate_rows(rows: Iterable[Mapping[str, Any]], results: Iterable[Mapping[str, Any]], task: str,
                  **metric_arguments: Any) -> Dict[str, Any]:
    """Score precomputed results (same order as rows) without running a model."""
    metric: Union[PanopticQualityMetric, CocoInstanceMetric, SemanticSegmentationMetric]
    metric = {"panoptic": PanopticQualityMetric, "instance": CocoInstanceMetric,
              "semantic": SemanticSegmentationMetric}[task](**metric_arguments)
    for row, result in zip(rows, results):
        metric.add(result, dict(row))
    return metric.evaluate()
