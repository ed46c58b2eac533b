"""ModelScope ``Pipeline``: image(s) -> panoptic / semantic / instance segments (DESIGN.md output contract)."""
import importlib
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from modelscope.pipelines.base import Pipeline
from modelscope.pipelines.builder import PIPELINES
from modelscope.utils.constant import Tasks

from ..errors import PerItemErrorsMixin
from ..model_dir import MODEL_TYPES, read_configuration_json
from ..postprocessing import instance_inference, panoptic_inference, semantic_inference
from ..precision import check_precision, inference_context
from ..preprocessing import PreparedImage, group_by_padded_size, load_image, prepare_image
from .model import Mask2FormerModel
from .outputs import DEFAULT_MAX_POSTPROCESS_PIXELS, build_outputs, postprocess_size

TASKS = ("panoptic", "semantic", "instance")

# ModelScope's own pipeline class for each type name this package registers over, for model types it does not run
BUILTIN_PIPELINE_MODULES = {
    "image-panoptic-segmentation": "modelscope.pipelines.cv.image_panoptic_segmentation_pipeline",
    "image-semantic-segmentation": "modelscope.pipelines.cv.image_semantic_segmentation_pipeline",
    "fast-instance-segmentation": "modelscope.pipelines.cv.fast_instance_segmentation_pipeline",
}


def builtin_pipeline_class(type_name: str):
    """Imports ModelScope's built-in pipeline registered under ``type_name`` without losing this package's entry."""
    group = PIPELINES._modules[Tasks.image_segmentation]
    ours = group.pop(type_name)
    try:
        importlib.import_module(BUILTIN_PIPELINE_MODULES[type_name])
        return group[type_name]
    finally:
        group[type_name] = ours


class Mask2FormerSegmentationPipeline(PerItemErrorsMixin, Pipeline):
    """``pipeline(Tasks.image_segmentation, model=...)`` for the Mask2Former and FastInst hub ids.

    Call parameters: ``task`` ("panoptic", "semantic" or "instance"; default: the model's), and the thresholds
    ``object_mask_threshold`` (0.8), ``overlap_threshold`` (0.8), ``filter_low_score`` (True), ``max_per_image`` (100),
    ``score_thr`` (instance only, 0.5). Inputs: path, URL, PIL image (RGB), numpy array (BGR, ModelScope's
    convention), or a list of them; with ``batch_size`` a list is batched by padded size. ``on_error``: "raise"
    (default, as ModelScope: the first bad list item raises) or "return" (an error entry per bad item, see
    ``errors.PerItemErrorsMixin``). ``max_postprocess_pixels`` (2048 * 2048; None: no cap): larger inputs are
    post-processed at that many pixels and their masks brought to full size by nearest neighbour (outputs.py).
    Constructor: ``precision`` "fp32" (default), "bf16" (autocast; CPU or GPU) or "fp16" (CUDA), see precision.py;
    ``device`` as ModelScope ("cpu", "gpu", "cuda:0").
    """

    pipeline_type: str = ""

    @classmethod
    def _instantiate(cls, **kwargs):
        """Model types this package does not run go to ModelScope's own pipeline (or fail saying why)."""
        model = kwargs.get("model")
        if isinstance(model, str):
            model_type = read_configuration_json(Path(model)).get("model", {}).get("type")
            if model_type not in MODEL_TYPES:
                try:
                    return builtin_pipeline_class(cls.pipeline_type)(**kwargs)
                except ImportError as error:
                    raise RuntimeError(
                        f"model type {model_type!r} in {model} is served by ModelScope's built-in "
                        f"'{cls.pipeline_type}' pipeline, which could not be imported ({type(error).__name__}: {error}); "
                        "modelscope_plugin runs only the Mask2Former/FastInst ids. Install ModelScope's CV extras "
                        "(mmcv-full, mmdet) for that model."
                    ) from error
        return cls(**kwargs)

    def __init__(self, model, preprocessor=None, precision: str = "fp32", **kwargs):
        if isinstance(model, str):
            model = Mask2FormerModel(model, device=kwargs.get("device"))
        super().__init__(model=model, preprocessor=preprocessor, auto_collate=False, **kwargs)
        self.config = self.model.config
        check_precision(precision, self.device)
        self.precision = precision

    def _run_network(self, images: torch.Tensor):
        """(B, 3, H, W) on the CPU -> raw outputs, under inference mode and the chosen precision; to a GPU through
        pinned memory."""
        if self.device.type == "cuda":
            images = images.pin_memory().to(self.device, non_blocking=True)
        else:
            images = images.to(self.device)
        with inference_context(self.device, self.precision):
            return self.model(images)

    def _sanitize_parameters(self, task: Optional[str] = None, object_mask_threshold: Optional[float] = None,
                             overlap_threshold: Optional[float] = None, filter_low_score: Optional[bool] = None,
                             max_per_image: Optional[int] = None, score_thr: Optional[float] = None,
                             max_postprocess_pixels: Optional[int] = DEFAULT_MAX_POSTPROCESS_PIXELS, **unused):
        if unused:
            raise TypeError(f"unknown pipeline parameters: {', '.join(sorted(unused))}")
        task = task or self.config.task
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        inference = self.config.inference
        postprocess = {
            "task": task,
            "object_mask_threshold": inference.object_mask_threshold if object_mask_threshold is None else object_mask_threshold,
            "overlap_threshold": inference.overlap_threshold if overlap_threshold is None else overlap_threshold,
            "filter_low_score": inference.filter_low_score if filter_low_score is None else filter_low_score,
            "max_per_image": inference.max_per_image if max_per_image is None else max_per_image,
            "score_thr": 0.5 if score_thr is None else score_thr,
            "max_postprocess_pixels": max_postprocess_pixels,
        }
        return {}, {}, postprocess

    def _check_input(self, input):
        pass  # load_image raises ImageInputError naming the input and the reason

    def preprocess(self, input) -> Dict[str, Any]:
        return {"image": prepare_image(load_image(input), self.config.preprocess)}

    def forward(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        image: PreparedImage = inputs["image"]
        output = self._run_network(image.tensor[None])
        return {"image": image, "class_logits": output.class_logits[0], "mask_logits": output.mask_logits[0]}

    def postprocess(self, inputs: Dict[str, Any], task: str = "panoptic", object_mask_threshold: float = 0.8,
                    overlap_threshold: float = 0.8, filter_low_score: bool = True, max_per_image: int = 100,
                    score_thr: float = 0.5, max_postprocess_pixels: Optional[int] = DEFAULT_MAX_POSTPROCESS_PIXELS) -> Dict[str, Any]:
        image: PreparedImage = inputs["image"]
        sizes = dict(padded_size=image.padded_size, resized_size=image.resized_size,
                     original_size=postprocess_size(image.original_size, max_postprocess_pixels))
        class_logits, mask_logits = inputs["class_logits"].float(), inputs["mask_logits"].float()
        semantic_map = None
        if task == "panoptic":
            segments = panoptic_inference(class_logits, mask_logits, self.config.num_things_classes, **sizes,
                                          object_mask_threshold=object_mask_threshold, overlap_threshold=overlap_threshold,
                                          filter_low_score=filter_low_score).segments
        elif task == "semantic":
            semantic_map, segments = semantic_inference(class_logits, mask_logits, **sizes)
        else:
            segments = instance_inference(class_logits, mask_logits, self.config.num_things_classes, **sizes,
                                          max_per_image=max_per_image,
                                          mask_from_probability=self.config.inference.mask_from_probability,
                                          score_threshold=score_thr)
        return build_outputs(task, segments, self.config.class_names, self.config.category_ids, image.original_size, semantic_map)

    def _process_batch(self, input: List, batch_size: int, **kwargs) -> List[Dict[str, Any]]:
        """Runs each group of same-padded-size images as one batch; every result equals the single-image one up to
        float rounding (oneDNN's convolution algorithm depends on the batch size: a pixel at a threshold can flip)."""
        postprocess_params = kwargs.get("postprocess_params", {})
        if not self._model_prepare:
            self.prepare_model()
        results: List[Optional[Dict[str, Any]]] = [None] * len(input)
        for start in range(0, len(input), batch_size):
            chunk = input[start:start + batch_size]
            prepared = [self.preprocess(item)["image"] for item in chunk]
            for indices, batch in group_by_padded_size(prepared):
                output = self._run_network(batch)
                for position, index in enumerate(indices):
                    results[start + index] = self.postprocess(
                        {"image": prepared[index], "class_logits": output.class_logits[position],
                         "mask_logits": output.mask_logits[position]}, **postprocess_params)
        return results
