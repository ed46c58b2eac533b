"""``configuration.json``, the file every hub-layout model directory starts from: which model types this package
runs, how the file is read (EasyCV's tuple encoding undone), and how the configuration read from it is checked
(``check_config``: every field of the config dataclasses, by its declared type, before a network is built)."""
import dataclasses
import json
import math
import typing
from contextlib import contextmanager
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from modelscope_plugin.config import (
    TASKS,
    eomt_large_coco_panoptic,
    fastinst_r50_d3_coco,
    oneformer_swin_large_coco,
    resnet50_coco_panoptic,
    swin_large_coco_panoptic,
    swin_large_coco_semantic,
)
from modelscope_plugin.errors import ModelDirError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".safetensors")
# config.json model types of Hugging Face folders this package runs
HF_MODEL_TYPES = ("mask2former", "eomt", "eomt_dinov3", "oneformer")

# configuration.json model types this package runs, and the defaults each starts from
MODEL_TYPES = {
    "swinL-panoptic-segmentation": swin_large_coco_panoptic,
    "swinL-semantic-segmentation": swin_large_coco_semantic,
    "r50-panoptic-segmentation": resnet50_coco_panoptic,
    "mask2former": swin_large_coco_panoptic,
    "fastinst": fastinst_r50_d3_coco,
    "eomt": eomt_large_coco_panoptic,
    "oneformer": oneformer_swin_large_coco,
}


def read_configuration_json(model_dir: Path) -> Dict[str, Any]:
    path = model_dir / "configuration.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no configuration.json")
    try:
        configuration = decode_easycv_tuples(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelDirError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(configuration, dict) or not isinstance(configuration.get("model", {}), dict):
        raise ModelDirError(f"{path} must hold a JSON object whose \"model\" is an object")
    return configuration


def decode_easycv_tuples(value):
    """EasyCV's ``to_ms_config`` writes tuples as {"__class__": "tuple", "__value__": [...]}."""
    if isinstance(value, dict):
        if value.get("__class__") == "tuple" and "__value__" in value:
            return tuple(decode_easycv_tuples(item) for item in value["__value__"])
        return {key: decode_easycv_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_easycv_tuples(item) for item in value]
    return value


INTEGER_MINIMUMS = {"num_things_classes": 0, "num_stuff_classes": 0, "num_aux_queries": 0, "category_ids": 0}
"""Integer fields that may be 0; every other integer field counts something and must be at least 1."""
NUMBER_RANGES = {"object_mask_threshold": (0.0, 1.0), "overlap_threshold": (0.0, 1.0), "score_threshold": (0.0, 1.0),
                 "drop_path_rate": (0.0, 1.0), "mean": (-math.inf, math.inf),
                 "layer_scale_init": (0.0, math.inf)}
"""Float fields with an inclusive range; every other float field (std, mlp_ratio) must be above 0."""
CHOICES = {"task": TASKS, "resize_backend": ("cv2", "pil", "torchvision"),
           "size_rule": ("mmcv", "transformers"),
           "source": ("mmdet", "easycv", "detectron2", "hf"), "depth": (18, 34, 50, 101)}


@contextmanager
def reading_values(where: str) -> Iterator[None]:
    """Raw errors that values of the wrong shape cause while a configuration is converted (a list where a number
    belongs, an unknown field name) -> one ``ModelDirError`` naming ``where``."""
    try:
        yield
    except ModelDirError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:
        raise ModelDirError(f"{where}: a value has the wrong type or form ({type(error).__name__}: {error})") from error


def check_config(config, where: str, names: Optional[Dict[str, str]] = None) -> None:
    """Raises ``ModelDirError`` naming ``where``, the field and the reason for the first field of ``config`` (a
    config dataclass, nested ones included) whose value does not fit its declared type and range, or for
    channel counts that the network's layers cannot split. ``names``: the file's name of a field where it is not
    the field's own path (``{"num_heads": "model.decoder.nheads"}``)."""
    _check_dataclass(config, where, "", names or {})
    hidden_dim = config.hidden_dim
    for name in ("num_heads", "num_groups"):
        if hidden_dim % getattr(config, name):
            raise ModelDirError(f"{where}: hidden_dim ({hidden_dim}) is not divisible by {name} "
                                f"({getattr(config, name)})")
    backbone = config.backbone
    if hasattr(backbone, "depths"):
        if len(backbone.depths) != 4 or len(backbone.num_heads) != 4:
            raise ModelDirError(f"{where}: backbone.depths and backbone.num_heads must each have 4 stages, got "
                                f"{backbone.depths} and {backbone.num_heads}")
        for stage, heads in enumerate(backbone.num_heads):
            if (backbone.embed_dim * 2 ** stage) % heads:
                raise ModelDirError(f"{where}: Swin stage {stage} has {backbone.embed_dim * 2 ** stage} channels, not "
                                    f"divisible by backbone.num_heads[{stage}] ({heads})")
    for name in ("class_names", "category_ids"):
        values = getattr(config, name)
        if values and len(values) != config.num_classes:
            raise ModelDirError(f"{where}: {name} has {len(values)} entries for {config.num_classes} classes")


def _check_dataclass(instance, where: str, prefix: str, names: Dict[str, str]) -> None:
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        path = prefix + field.name
        _check_value(getattr(instance, field.name), hints[field.name], field.name, where, names.get(path, path), names)


def _check_value(value, declared, name: str, where: str, path: str, names: Dict[str, str]) -> None:
    origin, arguments = typing.get_origin(declared), typing.get_args(declared)
    reason = None
    if origin is typing.Union:  # a choice of config dataclasses (the backbone), or an optional one
        if not isinstance(value, arguments):
            reason = f"is not one of {', '.join(argument.__name__ for argument in arguments)}"
        elif value is not None:
            _check_dataclass(value, where, path + ".", names)
    elif origin is tuple:
        reason = _tuple_reason(value, arguments)
        if reason is None:
            element = arguments[0]
            for index, item in enumerate(value):
                _check_value(item, element, name, where, f"{path}[{index}]", names)
    elif dataclasses.is_dataclass(declared):
        _check_dataclass(value, where, path + ".", names)
    else:
        reason = _scalar_reason(value, declared, name)
    if reason:
        raise ModelDirError(f"{where}: {path} = {value!r} {reason}")


def _tuple_reason(value, arguments: Tuple) -> Optional[str]:
    if not isinstance(value, tuple):
        return "is not a list"
    if arguments[-1] is not Ellipsis and len(value) != len(arguments):
        return f"must have {len(arguments)} entries"
    return None


def _scalar_reason(value, declared, name: str) -> Optional[str]:
    if declared is bool:
        return None if isinstance(value, bool) else "is not true or false"
    if declared is str:
        if not isinstance(value, str):
            return "is not a string"
    elif declared is int:
        if isinstance(value, bool) or not isinstance(value, Integral):
            return "is not a whole number"
        minimum = INTEGER_MINIMUMS.get(name, 1)
        if value < minimum:
            return f"must be at least {minimum}"
    elif declared is float:
        if isinstance(value, bool) or not isinstance(value, Real):
            return "is not a number"
        low, high = NUMBER_RANGES.get(name, (0.0, math.inf))
        if not math.isfinite(value):
            return "is not finite"
        if name in NUMBER_RANGES and not low <= value <= high:
            return f"must lie in [{low}, {high}]"
        if name not in NUMBER_RANGES and value <= 0:
            return "must be above 0"
    if name in CHOICES and value not in CHOICES[name]:
        return f"is not one of {', '.join(map(repr, CHOICES[name]))}"
    return None


def synthesized_configuration(path) -> Optional[Dict[str, Any]]:
    """The ``configuration.json`` ModelScope should see for a layout that has none but this package loads (a
    Hugging Face folder of a supported model type, or a single checkpoint file: EasyCV export, FastInst release);
    None for anything else, which stays ModelScope's to handle."""
    path = Path(path)
    if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
        pass
    elif path.is_dir() and not (path / "configuration.json").is_file() and (path / "config.json").is_file():
        try:
            model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        if model_type not in HF_MODEL_TYPES:
            return None
    else:
        return None
    return {"framework": "pytorch", "task": "image-segmentation", "model": {"type": "mask2former"},
            "pipeline": {"type": "mask2former-segmentation"}}
