"""Inference in one place: image -> network input -> raw logits -> the output contract.

``Predictor(network, config)`` is what the ModelScope pipeline, evaluation during training, ``evaluate()``, the
command line and the browser demo run (the last three through the pipeline). Each image is decoded once
(``prepare``), the network runs under inference mode and the chosen precision (``run``), and post-processing
turns one image's logits into masks, labels, scores and boxes (``postprocess``). Every threshold defaults to the
model's ``InferenceConfig``; a call parameter overrides it for that call.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from modelscope_plugin.config import TASKS, EomtConfig, FastInstConfig, Mask2FormerConfig, OneFormerConfig
from modelscope_plugin.errors import ImageInputError, TaskError
from modelscope_plugin.inference.outputs import DEFAULT_MAX_POSTPROCESS_PIXELS, build_outputs, postprocess_size
from modelscope_plugin.inference.postprocess import (
    instance_inference,
    panoptic_inference,
    semantic_inference,
    window_semantic_inference,
)
from modelscope_plugin.inference.precision import inference_context, resolve_precision
from modelscope_plugin.inference.preprocess import (
    ImageInput,
    PreparedImage,
    describe_input,
    group_by_padded_size,
    load_image,
    prepare_image,
    prepare_windows,
)

ON_ERROR_CHOICES = ("raise", "return")


@dataclass(frozen=True)
class PostprocessParameters:
    """The task and thresholds one call post-processes with (see ``InferenceConfig`` for their meaning)."""

    task: str
    object_mask_threshold: float
    overlap_threshold: float
    filter_low_score: bool
    max_per_image: int
    score_threshold: float
    max_postprocess_pixels: Optional[int]


def error_entry(index: int, item: Any, error: Exception) -> Dict[str, Any]:
    """The result of a bad list item under ``on_error="return"``: no segments, and what went wrong."""
    return {"masks": [], "labels": [], "scores": [],
            "error": {"index": index, "input": describe_input(item), "type": type(error).__name__,
                      "message": str(error)}}


def image_logits(image: PreparedImage, output, position: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The class and mask logits of the image at ``position`` in a batch's network output: (Q, K + 1) and (Q, h, w);
    for an image cut into windows, whose windows are the whole batch, every row: (N, Q, K + 1) and (N, Q, h, w)."""
    if image.window_starts:
        return output.class_logits, output.mask_logits
    return output.class_logits[position], output.mask_logits[position]


class Predictor:
    """A loaded network and its configuration, answering images with the output contract.

    ``device``: where the network runs (default: where its parameters are); ``precision``: "fp32", "bf16"
    (autocast, CPU or GPU), "fp16" (CUDA) or "auto" (bf16 where the device has native bf16 units, else fp32; the
    resolved one is ``self.precision``), see ``precision.py``.
    """

    def __init__(self, network: torch.nn.Module,
                 config: Union[Mask2FormerConfig, FastInstConfig, EomtConfig, OneFormerConfig],
                 device: Optional[torch.device] = None, precision: str = "fp32"):
        self.network = network
        self.config = config
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.precision = resolve_precision(precision, self.device)  # "auto" -> "bf16" or "fp32" here

    def parameters(self, task: Optional[str] = None, object_mask_threshold: Optional[float] = None,
                   overlap_threshold: Optional[float] = None, filter_low_score: Optional[bool] = None,
                   max_per_image: Optional[int] = None, score_thr: Optional[float] = None,
                   max_postprocess_pixels: Optional[int] = DEFAULT_MAX_POSTPROCESS_PIXELS,
                   **unknown: Any) -> PostprocessParameters:
        """The call parameters (ModelScope's names; ``None``: the model's default) -> ``PostprocessParameters``."""
        if unknown:
            raise TypeError(f"unknown pipeline parameters: {', '.join(sorted(unknown))}")
        task = task or self.config.task
        if task not in TASKS:
            raise TaskError(f"task must be one of {TASKS}, got {task!r}")
        defaults = self.config.inference

        def chosen(value, default):
            return default if value is None else value

        return PostprocessParameters(
            task=task,
            object_mask_threshold=chosen(object_mask_threshold, defaults.object_mask_threshold),
            overlap_threshold=chosen(overlap_threshold, defaults.overlap_threshold),
            filter_low_score=chosen(filter_low_score, defaults.filter_low_score),
            max_per_image=chosen(max_per_image, defaults.max_per_image),
            score_threshold=chosen(score_thr, defaults.score_threshold),
            max_postprocess_pixels=max_postprocess_pixels,
        )

    def uses_windows(self, task: Optional[str] = None) -> bool:
        """Whether ``task`` (default: the model's) runs on sliding windows: semantic inference of an EoMT whose
        configuration asks for them (``EomtConfig.semantic_windows``)."""
        return (isinstance(self.config, EomtConfig) and self.config.semantic_windows
                and (task or self.config.task) == "semantic")

    def run_key(self, task: Optional[str] = None) -> Optional[str]:
        """What the network input and run depend on besides the image: the task for OneFormer (told the task) and for
        EoMT's semantic windows, else nothing (one run serves every task)."""
        task = task or self.config.task
        return task if isinstance(self.config, OneFormerConfig) or self.uses_windows(task) else None

    def prepare(self, image: ImageInput, task: Optional[str] = None) -> PreparedImage:
        """Decodes ``image`` (path, URL, PIL image, BGR array) once and makes the network input for ``task``
        (default: the model's); for FastInst, padded so that its stride-16 map has a pixel for every query however
        elongated the image is; for EoMT's windowed semantic inference, resized and cut into square windows."""
        rgb = load_image(image)
        if self.uses_windows(task):
            return prepare_windows(rgb, self.config.preprocess, self.config.image_size)
        minimum_feature_pixels = self.config.num_queries if isinstance(self.config, FastInstConfig) else 0
        return prepare_image(rgb, self.config.preprocess, minimum_feature_pixels)

    def run(self, pixels: torch.Tensor, task: Optional[str] = None):
        """(B, 3, H, W) on the CPU -> the network's raw output, under inference mode and the chosen precision; to a
        GPU through pinned memory. OneFormer is told ``task`` (default: the model's)."""
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        else:
            pixels = pixels.to(self.device)
        with inference_context(self.device, self.precision):
            if isinstance(self.config, OneFormerConfig):
                return self.network(pixels, task=task or self.config.task)
            return self.network(pixels)

    def postprocess(self, image: PreparedImage, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                    parameters: PostprocessParameters) -> Dict[str, Any]:
        """One image's (Q, K + 1) class and (Q, h, w) mask logits -> the output contract at its original size. An
        image cut into windows (``image.window_starts``) has (N, Q, K + 1) and (N, Q, h, w), one row per window, and
        only the semantic task."""
        sizes = dict(padded_size=image.padded_size, resized_size=image.resized_size,
                     original_size=postprocess_size(image.original_size, parameters.max_postprocess_pixels))
        class_logits, mask_logits = class_logits.float(), mask_logits.float()
        semantic_map = None
        if image.window_starts:
            if parameters.task != "semantic":
                raise ValueError(f"an image prepared in windows answers only the semantic task, not "
                                 f"{parameters.task!r}: prepare it with that task")
            semantic_map, segments = window_semantic_inference(
                class_logits, mask_logits, image.window_starts, image.resized_size, sizes["original_size"])
        elif parameters.task == "panoptic":
            segments = panoptic_inference(
                class_logits, mask_logits, self.config.num_things_classes, **sizes,
                object_mask_threshold=parameters.object_mask_threshold,
                overlap_threshold=parameters.overlap_threshold, filter_low_score=parameters.filter_low_score).segments
        elif parameters.task == "semantic":
            semantic_map, segments = semantic_inference(class_logits, mask_logits, **sizes)
        else:
            segments = instance_inference(
                class_logits, mask_logits, self.config.num_things_classes, **sizes,
                max_per_image=parameters.max_per_image,
                mask_from_probability=self.config.inference.mask_from_probability,
                score_threshold=parameters.score_threshold)
        return build_outputs(parameters.task, segments, self.config.class_names, self.config.category_ids,
                             image.original_size, semantic_map)

    def predict_prepared(self, images: Sequence[PreparedImage],
                         parameters: PostprocessParameters) -> List[Dict[str, Any]]:
        """Runs each group of same-padded-size images as one batch; every result equals the single-image one up to
        float rounding (oneDNN's convolution algorithm depends on the batch size: a pixel at a threshold can flip)."""
        results: List[Optional[Dict[str, Any]]] = [None] * len(images)
        for indices, batch in group_by_padded_size(images):
            output = self.run(batch, parameters.task)
            for position, index in enumerate(indices):
                class_logits, mask_logits = image_logits(images[index], output, position)
                results[index] = self.postprocess(images[index], class_logits, mask_logits, parameters)
        return results

    def predict_list(self, items: Sequence[ImageInput], parameters: PostprocessParameters, batch_size: int = 1,
                     on_error: str = "raise") -> List[Dict[str, Any]]:
        """Images in chunks of ``batch_size``. ``on_error="raise"``: the first bad item raises its
        ``ImageInputError``, prefixed with its position; ``"return"``: a bad item gets ``error_entry(...)`` in its place
        and every other item its normal result."""
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, not {on_error!r}")
        results: List[Optional[Dict[str, Any]]] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            prepared_indices: List[int] = []
            prepared_images: List[PreparedImage] = []
            for index in range(start, min(start + batch_size, len(items))):
                try:
                    prepared_images.append(self.prepare(items[index], parameters.task))
                except ImageInputError as error:
                    if on_error == "raise":
                        raise ImageInputError(f"list item {index}: {error}") from error
                    results[index] = error_entry(index, items[index], error)
                    continue
                prepared_indices.append(index)
            for index, result in zip(prepared_indices, self.predict_prepared(prepared_images, parameters)):
                results[index] = result
        return results

    def __call__(self, image: ImageInput, **parameters: Any) -> Dict[str, Any]:
        """One image -> its result dict; ``parameters`` as ``parameters()`` takes them."""
        chosen = self.parameters(**parameters)
        return self.predict_prepared([self.prepare(image, chosen.task)], chosen)[0]
