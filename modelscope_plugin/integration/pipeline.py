"""ModelScope ``Pipeline``: image(s) -> panoptic / semantic / instance segments, through ``inference.Predictor``."""
import importlib
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from modelscope.pipelines.base import Pipeline
from modelscope.pipelines.builder import PIPELINES
from modelscope.preprocessors import Preprocessor
from modelscope.utils.constant import Frameworks, Tasks

from modelscope_plugin import visualization
from modelscope_plugin.errors import USER_ERRORS, CommandError
from modelscope_plugin.inference.predictor import PostprocessParameters, Predictor, image_logits
from modelscope_plugin.inference.preprocess import PreparedImage
from modelscope_plugin.integration.model import SegmentationModel
from modelscope_plugin.integration.registry import PIPELINE_TYPES
from modelscope_plugin.model_dirs.configuration import MODEL_TYPES, read_configuration_json, synthesized_configuration

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


class ImagePreparation(Preprocessor):
    """The pipeline's preprocessor, ``Predictor.prepare`` (decode once, resize, normalise, pad). Handing ModelScope's
    ``Pipeline`` one keeps it from searching configuration.json for a preprocessor section these models do not have
    (and warning, at every pipeline built, that there is none)."""

    def __init__(self):
        super().__init__(mode="inference")
        self.predictor: Optional[Predictor] = None

    def __call__(self, image, task: Optional[str] = None) -> Dict[str, Any]:
        return {"image": self.predictor.prepare(image, task)}


class SegmentationPipeline(Pipeline):
    """``pipeline(Tasks.image_segmentation, model=...)`` for the Mask2Former and FastInst hub ids.

    Call parameters: ``task`` ("panoptic", "semantic" or "instance"; default: the model's), and the thresholds
    ``object_mask_threshold``, ``overlap_threshold``, ``filter_low_score``, ``max_per_image``, ``score_thr``
    (instance only), each defaulting to the model's ``InferenceConfig``. Inputs: path, URL, PIL image (RGB), numpy
    array (BGR, ModelScope's convention), or a list of them; with ``batch_size`` a list is batched by padded size.
    ``on_error`` (lists): "raise" (default, as ModelScope: the first bad item raises) or "return" (an error entry per
    bad item, the others intact). ``max_postprocess_pixels`` (2048 * 2048; None: no cap): larger inputs are
    post-processed at that many pixels and their masks brought to full size by nearest neighbour (outputs.py).
    Constructor: ``precision`` "fp32" (default), "bf16" (autocast; CPU or GPU), "fp16" (CUDA) or "auto" (bf16 where
    the device has native bf16 units, else fp32), see precision.py;
    ``device`` as ModelScope ("cpu", "gpu", "cuda:0"); ``class_names``: the classes' names for a checkpoint that
    records none, ``thing_ids``: its thing classes (``load_model``).
    """

    pipeline_type: str = ""

    @classmethod
    def _instantiate(cls, **kwargs):
        """Model types this package does not run go to ModelScope's own pipeline (or fail saying why)."""
        model = kwargs.get("model")
        if isinstance(model, str) and synthesized_configuration(model) is None:
            model_type = read_configuration_json(Path(model)).get("model", {}).get("type")
            if model_type not in MODEL_TYPES:
                try:
                    return builtin_pipeline_class(cls.pipeline_type)(**kwargs)
                except ImportError as error:
                    raise RuntimeError(
                        f"model type {model_type!r} in {model} is served by ModelScope's built-in "
                        f"'{cls.pipeline_type}' pipeline, which could not be imported "
                        f"({type(error).__name__}: {error}); "
                        "modelscope_plugin runs only the Mask2Former/FastInst ids. Install ModelScope's CV extras "
                        "(mmcv-full, mmdet) for that model."
                    ) from error
        return cls(**kwargs)

    def __init__(self, model, preprocessor=None, precision: str = "fp32",
                 class_names: Optional[Sequence[str]] = None, thing_ids: Optional[Sequence[int]] = None, **kwargs):
        if isinstance(model, str):
            model = SegmentationModel(model, device=kwargs.get("device"), class_names=class_names,
                                      thing_ids=thing_ids)
        if preprocessor is None:
            preprocessor = ImagePreparation()
        super().__init__(model=model, preprocessor=preprocessor, auto_collate=False, **kwargs)
        self.config = self.model.config
        self.predictor = Predictor(self.model.network, self.config, device=self.device, precision=precision)
        if isinstance(self.preprocessor, ImagePreparation):
            self.preprocessor.predictor = self.predictor

    def _get_framework(self) -> str:
        """Always PyTorch (ModelScope reads it from configuration.json, which not every supported layout has)."""
        return Frameworks.torch

    def __call__(self, input, *args, on_error: str = "raise", batch_size: int = None, **kwargs):
        if not isinstance(input, list):
            return super().__call__(input, *args, **kwargs)
        if not self._model_prepare:
            self.prepare_model()
        parameters = self.predictor.parameters(**kwargs)
        return self.predictor.predict_list(input, parameters, batch_size=batch_size or 1, on_error=on_error)

    def _sanitize_parameters(self, **parameters):
        chosen = self.predictor.parameters(**parameters)
        # the task decides the preparation (EoMT's semantic windows) and reaches the network (OneFormer is told it)
        return {"task": chosen.task}, {"task": chosen.task}, {"parameters": chosen}

    def _check_input(self, input):
        pass  # load_image raises ImageInputError naming the input and the reason

    def preprocess(self, input, task: Optional[str] = None) -> Dict[str, Any]:
        # whatever preprocessor was given: images need this one
        return {"image": self.predictor.prepare(input, task)}

    def forward(self, inputs: Dict[str, Any], task: Optional[str] = None) -> Dict[str, Any]:
        image: PreparedImage = inputs["image"]
        class_logits, mask_logits = image_logits(image, self.predictor.run(image.network_input(), task))
        return {"image": image, "class_logits": class_logits, "mask_logits": mask_logits}

    def postprocess(self, inputs: Dict[str, Any], parameters: PostprocessParameters) -> Dict[str, Any]:
        return self.predictor.postprocess(inputs["image"], inputs["class_logits"], inputs["mask_logits"], parameters)


def build_pipeline(model: str, device: str, class_names: Optional[Sequence[str]] = None,
                   thing_ids: Optional[Sequence[int]] = None, precision: str = "fp32"):
    """ModelScope's pipeline for ``model``; this package's own errors pass through, others are reported as a failed
    model. ``class_names``, ``thing_ids``: for a checkpoint that records none (``load_model``); ``precision``: as the
    pipeline's (an unknown one is a ``CommandError`` naming it, before the model loads)."""
    from modelscope.pipelines import pipeline

    from modelscope_plugin.inference.precision import PRECISION_CHOICES

    if precision not in PRECISION_CHOICES:
        raise CommandError(f"precision must be one of {list(PRECISION_CHOICES)}, got {precision!r}")
    extra = {name: list(value) for name, value in (("class_names", class_names), ("thing_ids", thing_ids))
             if value is not None}
    if precision != "fp32":  # the pipeline's default; ModelScope's own pipelines (other model types) take none
        extra["precision"] = precision
    try:
        return pipeline(Tasks.image_segmentation, model=model, device=device, **extra)
    except USER_ERRORS:
        raise
    except Exception as error:  # ModelScope raises ValueError/RuntimeError/KeyError flavours for unusable models
        raise CommandError(f"cannot build a segmentation pipeline for {model}: "
                           f"{type(error).__name__}: {error}") from error


def pipeline_class(type_name: str):
    """One subclass per type name, so a model this package does not run can be handed to the right built-in."""
    return type(f"SegmentationPipeline_{type_name.replace('-', '_')}", (SegmentationPipeline,),
                {"pipeline_type": type_name, "__module__": SegmentationPipeline.__module__})


def use_package_drawing_helpers() -> None:
    """ModelScope's panoptic / semantic drawing helpers need mmdet; this package's draw the same without it."""
    try:
        import modelscope.utils.cv.image_utils as image_utils
    except ImportError:  # image_utils needs matplotlib and cv2, both declared dependencies
        return
    image_utils.panoptic_seg_masks_to_image = visualization.panoptic_seg_masks_to_image
    image_utils.semantic_seg_masks_to_image = visualization.semantic_seg_masks_to_image


for _type_name in PIPELINE_TYPES:
    PIPELINES.register_module(Tasks.image_segmentation, module_name=_type_name, module_cls=pipeline_class(_type_name),
                              force=True)
use_package_drawing_helpers()
