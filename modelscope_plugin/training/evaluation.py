"""Evaluation during training: the pipeline's own ``Predictor``, each image scored once.

ModelScope's ``multi_gpu_test`` pads the distributed sampler with duplicate images (they are scored twice). Here
rank r scores images r, r + N, r + 2N, ... and the metric objects (``Metric.merge``) are gathered, so every image
counts once and every rank returns the same values.
"""
from typing import Any, Dict, List, Mapping, Sequence

import torch

from modelscope_plugin.inference.predictor import Predictor
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


def evaluate_network(network: torch.nn.Module, config, rows: Sequence[Mapping[str, Any]], metrics: List[Any], task: str,
                  device: torch.device, **thresholds: Any) -> Dict[str, Any]:
    """Scores this rank's share of ``rows`` into ``metrics``, merges the ranks' metrics, returns all results."""
    rank, world_size = rank_and_world_size()
    predictor = Predictor(network, config, device=device)
    was_training = network.training
    network.eval()
    try:
        for index in range(rank, len(rows), world_size):
            row = dict(rows[index])
            outputs = predictor(row["image_path"], task=task, **thresholds)
            for metric in metrics:
                metric.add(outputs, row)
    finally:
        network.train(was_training)
    metrics = merge_metrics(metrics)
    results: Dict[str, Any] = {}
    for metric in metrics:
        results.update(metric.evaluate())
    return results
