"""Makes ModelScope find this package's classes (the package's only import side effect), without importing them.

ModelScope's ``build_from_cfg`` imports the module its AST index names for a (registry, group, type) signature
*before* looking in the registry. So registration here only points the index entries of this package's type names
(and of the built-in names it serves: otherwise ModelScope would import its own mmcv/mmdet-based modules) at this
package's modules; each of those modules registers its classes when it is imported, which happens when ModelScope
first builds one of them. ``import modelscope_plugin`` therefore imports neither the networks (torchvision), nor
the trainer, metrics or datasets. The functions ModelScope's builders call to resolve ids and install plugins are
wrapped here, since a user may call ``pipeline()``, ``Model.from_pretrained`` or ``build_trainer`` at once.
"""
from pathlib import Path

import modelscope.models.base.base_model as base_model
import modelscope.pipelines.base as pipeline_base
import modelscope.pipelines.builder as pipeline_builder
from modelscope.metainfo import Trainers
from modelscope.utils.constant import Tasks
from modelscope.utils.import_utils import LazyImportModule
from modelscope.utils.registry import default_group

from modelscope_plugin.integration import hub
from modelscope_plugin.model_dirs.configuration import MODEL_TYPES

PIPELINE_TYPES = ("image-panoptic-segmentation", "image-semantic-segmentation", "image-panoptic-segmentation-easycv",
                  "mask2former-segmentation", "fast-instance-segmentation")
TRAINER_TYPES = ("mask2former-segmentation",)
# ``build_trainer('easycv', ...)``: this package's trainer for its model types, EasyCV's for the others
EASYCV_TRAINER_TYPES = ("easycv",)
# ``dataset.{train,val}.type`` of COCO panoptic data in a hub dataset archive (EasyCV's DetDataset sections)
DATASET_TYPE = "mask2former-coco-panoptic-dataset"
METRIC_TYPES = ("segmentation-panoptic-quality", "segmentation-coco-instance-ap", "segmentation-semantic-miou")
PACKAGE = Path(__file__).resolve().parents[1]

# (ModelScope registry, group, type names, the module of this package that registers them when imported)
LAZY_ENTRIES = (
    ("MODELS", Tasks.image_segmentation, tuple(MODEL_TYPES), "modelscope_plugin.integration.model"),
    ("PIPELINES", Tasks.image_segmentation, PIPELINE_TYPES, "modelscope_plugin.integration.pipeline"),
    ("TRAINERS", default_group, TRAINER_TYPES, "modelscope_plugin.integration.trainer"),
    ("TRAINERS", default_group, EASYCV_TRAINER_TYPES, "modelscope_plugin.integration.easycv_trainer"),
    ("CUSTOM_DATASETS", Tasks.image_segmentation, (DATASET_TYPE,), "modelscope_plugin.integration.datasets"),
    ("METRICS", default_group, METRIC_TYPES, "modelscope_plugin.evaluation.metrics"),
)
_installed = False


def point_index_at(registry_name: str, group: str, type_name: str, module_name: str) -> None:
    """ModelScope imports ``module_name`` before it builds ``type_name`` from ``registry_name``'s ``group``."""
    index = LazyImportModule.get_ast_index()
    path = PACKAGE.joinpath(*module_name.split(".")[1:]).with_suffix(".py")
    index["index"][(registry_name, group, type_name)] = {"filepath": str(path), "imports": [], "module": module_name}
    index["requirements"][module_name] = []


def install() -> None:
    global _installed
    if _installed:
        return
    for registry_name, group, type_names, module_name in LAZY_ENTRIES:
        for type_name in type_names:
            point_index_at(registry_name, group, type_name, module_name)

    for builder in (pipeline_builder, _trainer_builder()):
        if builder is None:
            continue
        # hub ids resolve to the local cache first, no plugin pip runs
        builder.is_model_from_trusted_source = hub.wrap_is_model_from_trusted_source(
            builder.is_model_from_trusted_source)
        builder.is_official_hub_path = hub.wrap_is_official_hub_path(builder.is_official_hub_path)
        builder.read_config = hub.wrap_read_config(builder.read_config)
        builder.normalize_model_input = hub.wrap_normalize_model_input(builder.normalize_model_input)
        builder.register_plugins_repo = hub.wrap_register_plugins_repo(builder.register_plugins_repo)
    base_model.register_plugins_repo = hub.wrap_register_plugins_repo(base_model.register_plugins_repo)
    base_model._CONFIG_ONLY_MODELS = hub.configured_models(base_model._CONFIG_ONLY_MODELS)
    # the r50 card writes build_trainer(Trainers.easycv, ...); the constant left ModelScope with its EasyCV code
    if not hasattr(Trainers, "easycv"):
        Trainers.easycv = EASYCV_TRAINER_TYPES[0]
    # a pipeline reads its model's configuration again: layouts without configuration.json get the synthesized one
    pipeline_base.read_config = hub.wrap_read_config(pipeline_base.read_config)
    # Model.from_pretrained(hub id) resolves like pipeline(): the local cache first, no hub call for a cached id
    base_model.Model.from_pretrained = hub.wrap_from_pretrained(base_model.Model.from_pretrained.__func__)
    _installed = True


def _trainer_builder():
    try:
        import modelscope.trainers.builder as trainer_builder
    except ImportError:  # trainers need optional packages; nothing to patch without them
        return None
    return trainer_builder
