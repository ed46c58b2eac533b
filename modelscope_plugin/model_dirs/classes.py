"""Which classes are things, for checkpoints that do not record it (detectron2 ``.pkl`` files, Hugging Face folders).

Post-processing counts the first ``num_things_classes`` classes as things. ``things_first`` makes any set of thing
classes the first ones: the class head's rows (and the class names and dataset ids) are reordered, things first in
their order, then the stuff classes, then the no-object row; the network's scores are unchanged, only their order.
"""
import argparse
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from modelscope_plugin.config import Mask2FormerConfig
from modelscope_plugin.data.categories import ClassTable
from modelscope_plugin.errors import ModelDirError

CLASS_HEAD = "transformer_decoder.class_embed."
THING_IDS_HELP = ("the class indices that are things, for a checkpoint that does not say (a detectron2 .pkl, a Hugging "
                  "Face folder): panoptic then keeps instances of those classes apart")


def thing_ids_option(text: str) -> List[int]:
    """``--thing-ids 0,2,5``: class indices (an argparse ``type``)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, e.g. 0,2,5, not {text!r}") from None


def builtin_thing_ids(table: Optional[ClassTable], task: Optional[str]) -> Optional[Tuple[int, ...]]:
    """The thing classes of a built-in class set for a panoptic / instance ``task`` asked of a checkpoint whose
    classes are that set but not ordered things first (ADE20K, Cityscapes); None where nothing is to move."""
    if table is None or task not in ("panoptic", "instance") or table.num_things_classes > 0:
        return None
    return table.thing_indices


def things_first(config: Mask2FormerConfig, state_dict: Dict[str, torch.Tensor], thing_ids: Sequence[int],
                 where: str) -> Tuple[Mask2FormerConfig, Dict[str, torch.Tensor]]:
    """(config, native state dict) with the classes ``thing_ids`` (contiguous class indices) first, as things."""
    num_classes = config.num_classes
    things = [int(index) for index in thing_ids]
    if len(set(things)) != len(things) or any(not 0 <= index < num_classes for index in things):
        raise ModelDirError(f"{where}: thing ids {list(thing_ids)} must be distinct class indices in 0 .. "
                            f"{num_classes - 1}")
    order = things + [index for index in range(num_classes) if index not in set(things)]
    rows = torch.tensor(order + [num_classes])  # the no-object logit stays last
    reordered = dict(state_dict)
    for name in ("weight", "bias"):
        reordered[CLASS_HEAD + name] = state_dict[CLASS_HEAD + name][rows]  # (classes + 1, ...)
    category_ids = config.category_ids or tuple(range(num_classes))
    config = replace(config, class_names=tuple(config.class_names[index] for index in order),
                     category_ids=tuple(category_ids[index] for index in order), num_things_classes=len(things),
                     num_stuff_classes=num_classes - len(things))
    return config, reordered
