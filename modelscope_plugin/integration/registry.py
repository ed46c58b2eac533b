"""Registers this package's classes in ModelScope's registries (the package's only import side effect).

ModelScope's ``build_from_cfg`` imports the module its AST index names for a type *before* looking in the
registry; for the built-in type names that would import ModelScope's mmcv/mmdet-based modules. So the index
entries of the names registered here are pointed at this package's modules as well.
"""
from modelscope.models.builder import MODELS
from modelscope.pipelines.builder import PIPELINES
from modelscope.utils.constant import Tasks
from modelscope.utils.import_utils import LazyImportModule

from modelscope_plugin.integration import hub
from modelscope_plugin.integration.model import SegmentationModel
from modelscope_plugin.integration.pipeline import SegmentationPipeline
from modelscope_plugin.model_dirs.configuration import MODEL_TYPES

PIPELINE_TYPES = ("image-panoptic-segmentation", "image-semantic-segmentation", "image-panoptic-segmentation-easycv",
                  "mask2former-segmentation", "fast-instance-segmentation")
_installed = False


def _point_index_at(registry_name: str, type_name: str, module) -> None:
    index = LazyImportModule.get_ast_index()
    index["index"][(registry_name, Tasks.image_segmentation, type_name)] = {
        "filepath": module.__file__, "imports": [], "module": module.__name__,
    }
    index["requirements"][module.__name__] = []


def _pipeline_class(type_name: str):
    """One subclass per type name, so a non-Mask2Former model can be handed to the right built-in."""
    return type(f"SegmentationPipeline_{type_name.replace('-', '_')}", (SegmentationPipeline,),
                {"pipeline_type": type_name, "__module__": SegmentationPipeline.__module__})


def install() -> None:
    global _installed
    if _installed:
        return
    import modelscope.models.base.base_model as base_model
    import modelscope.pipelines.builder as pipeline_builder

    from modelscope_plugin.integration import model as model_module
    from modelscope_plugin.integration import pipeline as pipeline_module

    for type_name in MODEL_TYPES:
        MODELS.register_module(Tasks.image_segmentation, module_name=type_name, module_cls=SegmentationModel, force=True)
        _point_index_at("MODELS", type_name, model_module)
    for type_name in PIPELINE_TYPES:
        PIPELINES.register_module(Tasks.image_segmentation, module_name=type_name, module_cls=_pipeline_class(type_name), force=True)
        _point_index_at("PIPELINES", type_name, pipeline_module)

    pipeline_builder.is_model_from_trusted_source = hub.wrap_is_model_from_trusted_source(pipeline_builder.is_model_from_trusted_source)
    pipeline_builder.is_official_hub_path = hub.wrap_is_official_hub_path(pipeline_builder.is_official_hub_path)
    pipeline_builder.read_config = hub.wrap_read_config(pipeline_builder.read_config)
    pipeline_builder.normalize_model_input = hub.wrap_normalize_model_input(pipeline_builder.normalize_model_input)
    pipeline_builder.register_plugins_repo = hub.wrap_register_plugins_repo(pipeline_builder.register_plugins_repo)
    base_model.register_plugins_repo = hub.wrap_register_plugins_repo(base_model.register_plugins_repo)
    # Model.from_pretrained(hub id) resolves like pipeline(): the local cache first, no hub call for a cached id
    base_model.Model.from_pretrained = hub.wrap_from_pretrained(base_model.Model.from_pretrained.__func__)
    try:
        import modelscope.trainers.builder as trainer_builder
    except ImportError:  # trainers need optional packages; nothing to patch or register without them
        trainer_builder = None
    if trainer_builder is not None:
        trainer_builder.register_plugins_repo = hub.wrap_register_plugins_repo(trainer_builder.register_plugins_repo)
        # build_trainer resolves hub ids like pipeline(): the local cache first, no plugin pip runs
        trainer_builder.is_model_from_trusted_source = hub.wrap_is_model_from_trusted_source(trainer_builder.is_model_from_trusted_source)
        trainer_builder.is_official_hub_path = hub.wrap_is_official_hub_path(trainer_builder.is_official_hub_path)
        trainer_builder.read_config = hub.wrap_read_config(trainer_builder.read_config)
        trainer_builder.normalize_model_input = hub.wrap_normalize_model_input(trainer_builder.normalize_model_input)
        from modelscope_plugin.integration import trainer  # noqa: F401  (registers the Mask2Former trainer with TRAINERS; its errors surface)
    from modelscope_plugin import evaluation  # noqa: F401  (registers the PQ / COCO AP / mIoU metrics with METRICS)

    try:  # the cards' drawing helpers need mmdet in ModelScope; ours draw the same without it
        import modelscope.utils.cv.image_utils as image_utils

        from modelscope_plugin import visualization

        image_utils.panoptic_seg_masks_to_image = visualization.panoptic_seg_masks_to_image
        image_utils.semantic_seg_masks_to_image = visualization.semantic_seg_masks_to_image
    except ImportError:  # image_utils needs matplotlib and cv2, both declared dependencies
        pass
    _installed = True
