"""Evaluation during training: the pipeline's own ``Predictor``, each image scored once.

ModelScope's ``multi_gpu_test`` pads the distributed sampler with duplicate images (they are scored twice). Here
rank r scores images r, r + N, r + 2N, ... and the metric objects (``Metric.merge``) are gathered, so every image
counts once and every rank returns the same values. Each metric scores the outputs of its own task (PQ panoptic,
box / mask AP instance, mIoU semantic); the network runs once per image whatever the number of tasks (once per
task for OneFormer, whose task is a network input, and for EoMT's semantic windows).
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from modelscope_plugin.inference.predictor import Predictor, image_logits
from modelscope_plugin.ranks import merge_metrics, rank_and_world_size


def flat_metric_values(values: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """Numbers of a metric result, nested keys joined with '/' (``segm/AP``); per-class tables left out."""
    flat: Dict[str, float] = {}
    for key, value in values.items():
        if key == "per_class":
            continue
        if isinstance(value, Mapping):
            flat.update(flat_metric_values(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def evaluate_network(network: torch.nn.Module, config, rows: Sequence[Mapping[str, Any]], metrics: List[Any],
                     tasks: Sequence[str], device: torch.device,
                     thresholds: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Dict[str, Any]:
    """Scores this rank's share of ``rows`` into ``metrics`` (``tasks[i]``: the task whose outputs ``metrics[i]``
    scores; ``thresholds[task]``: that task's post-processing parameters), merges the ranks' metrics, returns all
    results."""
    rank, world_size = rank_and_world_size()
    predictor = Predictor(network, config, device=device)
    parameters = {task: predictor.parameters(task=task, **dict((thresholds or {}).get(task, {})))
                  for task in dict.fromkeys(tasks)}
    was_training = network.training
    network.eval()
    try:
        for index in range(rank, len(rows), world_size):
            row = dict(rows[index])
            # one forward pass per distinct network input (usually one per image: each task post-processes the same
            # (Q, K + 1) class and (Q, h, w) mask logits; OneFormer is told the task, EoMT's semantic task runs windows)
            runs: Dict[Any, Any] = {}
            outputs = {}
            for task, task_parameters in parameters.items():
                key = predictor.run_key(task)
                if key not in runs:
                    image = predictor.prepare(row["image_path"], task)
                    runs[key] = image, predictor.run(image.network_input(), task)
                image, output = runs[key]
                outputs[task] = predictor.postprocess(image, *image_logits(image, output), task_parameters)
            for metric, task in zip(metrics, tasks):
                metric.add(outputs[task], row)
    finally:
        network.train(was_training)
    metrics = merge_metrics(metrics)
    results: Dict[str, Any] = {}
    for metric in metrics:
        results.update(metric.evaluate())
    return results
