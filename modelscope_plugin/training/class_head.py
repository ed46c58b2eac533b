"""Finetuning to a new class set: the class head is re-initialised explicitly (never a ``strict=False`` load)."""
from dataclasses import replace
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import Mask2FormerConfig
from ..modeling.mask2former.model import Mask2Former
from .data import TrainingCategory


def adapt_class_head(config: Mask2FormerConfig, network: Mask2Former, categories: Sequence[TrainingCategory],
                     seed: int) -> Tuple[Mask2FormerConfig, Optional[str]]:
    """Gives ``network`` a class head for ``categories`` (things first) if they differ from ``config``'s classes.

    The new ``nn.Linear`` gets PyTorch's default initialisation (as every reference builds its class head) from a
    generator seeded with ``seed``; every other weight stays as loaded. Returns the new config and a log line
    (None when the class set is unchanged)."""
    names = tuple(category.name for category in categories)
    ids = tuple(category.id for category in categories)
    num_things = sum(category.isthing for category in categories)
    if names == tuple(config.class_names) and ids == tuple(config.category_ids) and num_things == config.num_things_classes:
        return config, None
    old_head = network.transformer_decoder.class_embed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new_head = nn.Linear(old_head.in_features, len(categories) + 1)
    network.transformer_decoder.class_embed = new_head.to(old_head.weight.device)
    new_config = replace(config, num_things_classes=num_things, num_stuff_classes=len(categories) - num_things,
                         class_names=names, category_ids=ids)
    message = (f"class head re-initialised for a new class set: {config.num_classes} classes -> {len(categories)} "
               f"({num_things} things, {len(categories) - num_things} stuff: {', '.join(names)}); "
               f"transformer_decoder.class_embed {tuple(old_head.weight.shape)} -> {tuple(new_head.weight.shape)}, "
               "every other weight loaded strictly from the model directory")
    return new_config, message
