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
from modelscope_plugin.data.categories import ClassTable, class_table_of_names
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


def with_things_first(config: Mask2FormerConfig, state_dict: Dict[str, torch.Tensor],
                      thing_ids: Optional[Sequence[int]], task: Optional[str],
                      where: str) -> Tuple[Mask2FormerConfig, Dict[str, torch.Tensor]]:
    """(config, native state dict) of a checkpoint that does not order its classes things first: ``thing_ids``
    (the caller's or the checkpoint's), else for a panoptic / instance ``task`` the things of the built-in class set
    its classes are (``builtin_thing_ids``), moved first (``things_first``); without ``task``, panoptic becomes the
    default where there are things and stuff. Unchanged where no thing ids apply."""
    if thing_ids is None:
        thing_ids = builtin_thing_ids(class_table_of_names(config.class_names), task)
    if thing_ids is None:
        return config, state_dict
    config, state_dict = things_first(config, state_dict, thing_ids, where)
    config = replace(config, task=task or ("panoptic" if 0 < config.num_things_classes < config.num_classes
                                           else config.task))
    return config, state_dict
