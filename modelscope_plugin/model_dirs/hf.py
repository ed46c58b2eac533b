"""Hugging Face ``Mask2FormerForUniversalSegmentation`` folders (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, read with ``weights_only``) ->
(Mask2FormerConfig, network with strictly loaded weights); the key table is ``checkpoints/hf.py``.

Classes: ``config.json``'s ``id2label`` (transformers' placeholder names ``LABEL_0`` ... count as none), or the names
the caller gives; without either, loading fails asking for them. Names equal to a built-in class set
(``data.categories.BUILTIN_CLASS_TABLES``) bring its thing / stuff split, dataset ids and default task; others are
all counted as things and answer semantic segmentation by default; thing ids (the caller's, or a OneFormer-style
``metadata.thing_ids``) put those classes first as things (``classes.things_first``) and make panoptic the default;
without them, a panoptic / instance ``task`` asked of ADE20K or Cityscapes classes puts that dataset's thing classes
first (``classes.with_things_first``).
``preprocessor_config.json``, where present, gives
the test size, mean, std and size divisor, and (OneFormer-style ``metadata``) class names and thing ids.
"""
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints.hf import backbone_type, hf_to_detectron2
from modelscope_plugin.checkpoints.io import load_strict, read_checkpoint
from modelscope_plugin.checkpoints.keymaps import convert_detectron2
from modelscope_plugin.config import Mask2FormerConfig, PreprocessConfig, ResNetConfig, SwinConfig
from modelscope_plugin.data.categories import class_table_of_names
from modelscope_plugin.errors import CheckpointError, ModelDirError
from modelscope_plugin.model_dirs.classes import with_things_first
from modelscope_plugin.model_dirs.configuration import check_config

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def config_from_hf(values: dict):
    """HF ``config.json`` (Mask2FormerConfig) -> this package's ``Mask2FormerConfig`` (detectron2 behaviour)."""
    source_backbone_type, backbone = backbone_type(values)
    if source_backbone_type == "swin":
        if backbone.get("use_absolute_embeddings"):
            raise CheckpointError("Swin absolute position embeddings are not supported")
        backbone_config = SwinConfig(embed_dim=backbone["embed_dim"], depths=tuple(backbone["depths"]),
                                     num_heads=tuple(backbone["num_heads"]), window_size=backbone["window_size"],
                                     patch_size=backbone.get("patch_size", 4), mlp_ratio=backbone.get("mlp_ratio", 4.0))
    else:
        depths = tuple(backbone["depths"])
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(depths)
        if depth is None:
            raise CheckpointError(f"ResNet depths {depths} are not ResNet-50/101")
        backbone_config = ResNetConfig(depth=depth)
    id2label = {int(key): value for key, value in values.get("id2label", {}).items()}
    num_classes = len(id2label) or values["num_labels"]
    # HF's decoder_layers counts the prediction before the first layer (as detectron2's DEC_LAYERS)
    return Mask2FormerConfig(
        backbone=backbone_config, num_things_classes=num_classes, num_stuff_classes=0,
        num_queries=values["num_queries"], hidden_dim=values["hidden_dim"], num_heads=values["num_attention_heads"],
        encoder_layers=values["encoder_layers"], encoder_feedforward_dim=values.get("encoder_feedforward_dim", 1024),
        decoder_layers=values["decoder_layers"] - 1, decoder_feedforward_dim=values["dim_feedforward"],
        source="hf", task="semantic",
        preprocess=PreprocessConfig(resize_backend="pil"),
    )


def read_hf_config(model_dir) -> dict:
    """A Hugging Face folder's ``config.json`` as a dict, or one ``CheckpointError`` naming the file and the reason."""
    config_path = Path(model_dir) / "config.json"
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, not {type(values).__name__}")
    return values


PLACEHOLDER_LABEL = re.compile(r"^LABEL_\d+$")
"""transformers' id2label when a config was made without class names."""


def read_preprocessor_config(model_dir: Path) -> Dict[str, Any]:
    """``preprocessor_config.json`` as a dict ({} when absent), or one ``ModelDirError`` naming the file."""
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelDirError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise ModelDirError(f"{path} must hold a JSON object, not {type(values).__name__}")
    return values


def preprocess_from_processor(values: Dict[str, Any], base: PreprocessConfig, where: str) -> PreprocessConfig:
    """An image processor's ``size`` ({"shortest_edge", "longest_edge"} or one number, with the older ``max_size``
    as the long-side cap), ``size_divisor``, ``image_mean`` / ``image_std`` (0..1 scale, as transformers stores them)
    over ``base``. The published ``facebook/mask2former-*`` folders say 384, the size transformers' processor uses
    (detectron2 tested them at 800)."""
    size = values.get("size")
    changes: Dict[str, Any] = {}
    if isinstance(size, dict):
        if "shortest_edge" in size:
            changes["short_side"] = size["shortest_edge"]
        if size.get("longest_edge") is not None:
            changes["long_side_max"] = size["longest_edge"]
    elif isinstance(size, int) and not isinstance(size, bool):
        changes["short_side"] = size
    elif size is not None:
        raise ModelDirError(f"{where}: size = {size!r} is neither a number nor an object with shortest_edge")
    if values.get("max_size") and "long_side_max" not in changes:
        changes["long_side_max"] = values["max_size"]
    if values.get("size_divisor"):
        changes["size_divisor"] = values["size_divisor"]
    for name, field in (("image_mean", "mean"), ("image_std", "std")):
        if values.get(name) is not None:
            numbers = values[name]
            if not (isinstance(numbers, list) and len(numbers) == 3
                    and all(isinstance(number, (int, float)) for number in numbers)):
                raise ModelDirError(f"{where}: {name} = {numbers!r} is not a list of 3 numbers")
            changes[field] = tuple(float(number) * 255.0 for number in numbers)
    if changes:
        changes["divide_by_std"] = True  # transformers normalises as (x - mean) / std
    return replace(base, **changes)


def name_classes(config: Mask2FormerConfig, class_names: Optional[Sequence[str]], task: Optional[str],
                 where: str) -> Mask2FormerConfig:
    """``config`` with named classes and its thing / stuff split (see the module docstring)."""
    num_classes = config.num_classes
    if class_names is None:
        raise ModelDirError(f"{where} names no classes (id2label is missing or transformers' placeholder LABEL_0 ...); "
                            "give them: class_names=[...] (load_model, pipeline) or --classes FILE (modelscope-seg), "
                            f"{num_classes} names, one per line in class order")
    class_names = tuple(str(name) for name in class_names)
    if len(class_names) != num_classes:
        raise ModelDirError(f"{where}: {len(class_names)} class names for its {num_classes} classes")
    table = class_table_of_names(class_names)
    if table is not None:
        num_things, category_ids, default_task = table.num_things_classes, table.category_ids, table.task
    else:
        num_things, category_ids, default_task = num_classes, tuple(range(num_classes)), "semantic"
    return replace(config, class_names=class_names, category_ids=category_ids, num_things_classes=num_things,
                   num_stuff_classes=num_classes - num_things, task=task or default_task)


def named_classes(values: Dict[str, Any], processor: Dict[str, Any]) -> Tuple[Optional[Tuple[str, ...]],
                                                                          Optional[Sequence[int]]]:
    """(class names, thing ids) a folder records: a OneFormer-style ``metadata`` in preprocessor_config.json, else
    ``config.json``'s id2label unless it holds transformers' placeholders; None where it records none."""
    metadata = processor.get("metadata") if isinstance(processor.get("metadata"), dict) else {}
    thing_ids = metadata.get("thing_ids")
    if metadata.get("class_names"):
        return tuple(metadata["class_names"]), thing_ids
    id2label = {int(key): value for key, value in (values.get("id2label") or {}).items()}
    names = tuple(str(id2label[index]) for index in sorted(id2label))
    if not names or all(PLACEHOLDER_LABEL.match(name) for name in names):
        return None, thing_ids
    return names, thing_ids


def load_hf_model_dir(model_dir, task: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                      thing_ids: Optional[Sequence[int]] = None):
    """(config, network) from a ``save_pretrained`` folder; weights strictly loaded. ``class_names``: the classes'
    names where the folder records none (or to replace its own); ``thing_ids``: the class indices that are things
    (``classes.things_first``; default: the folder's ``metadata.thing_ids``, else by the names)."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    values = read_hf_config(model_dir)
    weights = next((model_dir / name for name in HF_WEIGHT_FILES if (model_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has neither {' nor '.join(HF_WEIGHT_FILES)}")
    try:
        config = config_from_hf(values)
    except CheckpointError as error:
        raise type(error)(f"{config_path}: {error}") from error
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{config_path} lacks or mistypes a Mask2Former field ({type(error).__name__}: "
                              f"{error})") from error
    processor = read_preprocessor_config(model_dir)
    recorded_names, recorded_thing_ids = named_classes(values, processor)
    where = str(model_dir / "preprocessor_config.json")
    config = replace(config, preprocess=preprocess_from_processor(processor, config.preprocess, where))
    config = name_classes(config, class_names if class_names is not None else recorded_names, task, str(config_path))
    check_config(config, str(config_path))
    state_dict = convert_detectron2(hf_to_detectron2(read_checkpoint(weights), values))
    thing_ids = recorded_thing_ids if thing_ids is None else thing_ids
    config, state_dict = with_things_first(config, state_dict, thing_ids, task, str(model_dir))
    network = build_mask2former(config)
    load_strict(network, state_dict, checkpoint_name=str(weights))
    return config, network.eval()


def with_recorded_fields(config, values: Dict[str, Any], fields: Tuple[str, ...], model_dir: Path, model_name: str):
    """An HF EoMT / OneFormer ``config`` with the ``model.config`` values a hub-layout ``configuration.json`` records
    beside the HF files (``fields``, what ``config.json``'s id2label cannot say: things / stuff, dataset ids, task;
    and ``preprocess``) over it; the class count must stay the HF folder's."""
    unknown = set(values) - set(fields) - {"preprocess"}
    if unknown:
        raise ModelDirError(f"{model_dir}/configuration.json: unknown {model_name} model.config keys "
                            f"{sorted(unknown)} (known: {sorted(fields + ('preprocess',))})")
    changes = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()
               if key != "preprocess"}
    if "preprocess" in values:
        changes["preprocess"] = replace(config.preprocess, **{
            key: tuple(value) if isinstance(value, list) else value for key, value in values["preprocess"].items()})
    updated = replace(config, **changes)
    if updated.num_classes != config.num_classes or len(updated.class_names) != config.num_classes:
        raise ModelDirError(f"{model_dir}/configuration.json: {updated.num_things_classes} things + "
                            f"{updated.num_stuff_classes} stuff classes, {len(updated.class_names)} names, for the "
                            f"{config.num_classes} classes of config.json")
    return updated
