"""``configuration.json``, the file every hub-layout model directory starts from: which model types this package
runs, and how the file is read (EasyCV's tuple encoding undone)."""
import json
from pathlib import Path
from typing import Any, Dict

from modelscope_plugin.config import (
    eomt_large_coco_panoptic,
    fastinst_r50_d3_coco,
    resnet50_coco_panoptic,
    swin_large_coco_panoptic,
    swin_large_coco_semantic,
)
from modelscope_plugin.errors import ModelDirError

# configuration.json model types this package runs, and the defaults each starts from
MODEL_TYPES = {
    "swinL-panoptic-segmentation": swin_large_coco_panoptic,
    "swinL-semantic-segmentation": swin_large_coco_semantic,
    "r50-panoptic-segmentation": resnet50_coco_panoptic,
    "mask2former": swin_large_coco_panoptic,
    "fastinst": fastinst_r50_d3_coco,
    "eomt": eomt_large_coco_panoptic,
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
