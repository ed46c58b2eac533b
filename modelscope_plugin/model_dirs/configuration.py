"""``configuration.json``, the file every hub-layout model directory starts from: which model types this package
runs, and how the file is read (EasyCV's tuple encoding undone)."""
import json
from pathlib import Path
from typing import Any, Dict, Optional

from modelscope_plugin.config import (
    fastinst_r50_d3_coco,
    resnet50_coco_panoptic,
    swin_large_coco_panoptic,
    swin_large_coco_semantic,
)
from modelscope_plugin.errors import ModelDirError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".safetensors")
# config.json model types of Hugging Face folders this package runs
HF_MODEL_TYPES = ("mask2former",)

# configuration.json model types this package runs, and the defaults each starts from
MODEL_TYPES = {
    "swinL-panoptic-segmentation": swin_large_coco_panoptic,
    "swinL-semantic-segmentation": swin_large_coco_semantic,
    "r50-panoptic-segmentation": resnet50_coco_panoptic,
    "mask2former": swin_large_coco_panoptic,
    "fastinst": fastinst_r50_d3_coco,
}


def read_configuration_json(model_dir: Path) -> Dict[str, Any]:
    path = model_dir / "configuration.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no configuration.json")
    try:
        return decode_easycv_tuples(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise ModelDirError(f"{path} is not valid JSON: {error}") from error


def decode_easycv_tuples(value):
    """EasyCV's ``to_ms_config`` writes tuples as {"__class__": "tuple", "__value__": [...]}."""
    if isinstance(value, dict):
        if value.get("__class__") == "tuple" and "__value__" in value:
            return tuple(decode_easycv_tuples(item) for item in value["__value__"])
        return {key: decode_easycv_tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_easycv_tuples(item) for item in value]
    return value


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
