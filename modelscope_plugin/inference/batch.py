"""``BatchSegmenter``: segmentation as a callable over batches of image paths, for batch engines.

It is a Ray Data ``map_batches`` callable class: Ray builds it once per actor (so each actor loads the model once)
and calls it with batches of rows, a dict of columns::

    import ray
    from modelscope_plugin.inference.batch import BatchSegmenter

    results = ray.data.from_items([{"path": str(path)} for path in paths]).map_batches(
        BatchSegmenter, fn_constructor_kwargs={"model": "damo/cv_resnet50_fast-instance-segmentation_coco"},
        batch_size=4, concurrency=2)

Nothing here imports Ray: any engine that hands over ``{"path": [...]}`` batches can use it. Each output row holds
the image path, the result as JSON (the document ``modelscope-seg segment`` writes: COCO RLE masks, labels, scores,
boxes) and the error message of an image that could not be read (empty otherwise).
"""
import json
from typing import Any, Dict, Sequence

import numpy as np

from modelscope_plugin import visualization
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.integration.hub import is_supported_id, resolve_model_dir
from modelscope_plugin.model_dirs.load import load_model


class BatchSegmenter:
    """Loads ``model`` (hub id, model directory or checkpoint file) once; each call segments one batch of paths.

    ``parameters``: the pipeline's call parameters (``task``, ``score_thr``, ...), the same for every image."""

    def __init__(self, model: str, device: str = "cpu", precision: str = "fp32", batch_size: int = 1,
                 **parameters: Any):
        model_path = resolve_model_dir(model) if is_supported_id(model) else model
        config, network = load_model(model_path, task=parameters.get("task"))
        self.predictor = Predictor(network.to(device), config, device=device, precision=precision)
        self.parameters = self.predictor.parameters(**parameters)
        self.batch_size = batch_size

    def __call__(self, batch: Dict[str, Sequence[Any]]) -> Dict[str, np.ndarray]:
        paths = [str(path) for path in batch["path"]]
        results = self.predictor.predict_list(paths, self.parameters, batch_size=self.batch_size, on_error="return")
        documents = [json.dumps(visualization.segments_to_json(result)) for result in results]
        errors = [result["error"]["message"] if "error" in result else "" for result in results]
        return {"path": np.asarray(paths, dtype=object), "result": np.asarray(documents, dtype=object),
                "error": np.asarray(errors, dtype=object)}
