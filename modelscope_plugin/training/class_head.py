"""Finetuning to a new class set: the class head is re-initialised explicitly (never a ``strict=False`` load)."""
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from modelscope_plugin.config import EomtConfig, FastInstConfig, Mask2FormerConfig
from modelscope_plugin.modeling.eomt.model import Eomt
from modelscope_plugin.modeling.fastinst.model import FastInst
from modelscope_plugin.modeling.mask2former.model import Mask2Former
from modelscope_plugin.training.data import TrainingCategory


def class_head_layers(network: Union[Mask2Former, FastInst, Eomt]) -> List[str]:
    """Names of the layers whose outputs are the C + 1 class logits: Mask2Former's ``class_embed``; FastInst's last
    linear layer of every stage's class MLP and the instance-activation head's 1x1 convolution; EoMT's
    ``class_head`` (shared by the final and every query block's prediction)."""
    if isinstance(network, Eomt):
        return ["class_head"]
    if isinstance(network, FastInst):
        decoder = network.transformer_decoder
        names = [f"transformer_decoder.class_embed_layers.{stage}.layers.{len(mlp.layers) - 1}"
                 for stage, mlp in enumerate(decoder.class_embed_layers)]
        return names + ["transformer_decoder.query_proposal.conv_proposal_cls_logits."
                        f"{len(decoder.query_proposal.conv_proposal_cls_logits) - 1}"]
    return ["transformer_decoder.class_embed"]


def _resized_layer(layer: nn.Module, num_outputs: int) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, num_outputs)
    if isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1):
        return nn.Conv2d(layer.in_channels, num_outputs, kernel_size=1)
    raise TypeError(f"cannot re-initialise a class head layer of type {type(layer).__name__}")


def adapt_class_head(config: Union[Mask2FormerConfig, FastInstConfig, EomtConfig],
                     network: Union[Mask2Former, FastInst, Eomt], categories: Sequence[TrainingCategory],
                     seed: int) -> Tuple[Union[Mask2FormerConfig, FastInstConfig, EomtConfig], Optional[str]]:
    """Gives ``network`` class heads for ``categories`` (things first) if they differ from ``config``'s classes.

    Each new layer (``class_head_layers``) gets PyTorch's default initialisation (as every reference builds its
    class heads) from one generator seeded with ``seed``; every other weight stays as loaded. Returns the new
    config and a log line (None when the class set is unchanged)."""
    names = tuple(category.name for category in categories)
    ids = tuple(category.id for category in categories)
    num_things = sum(category.isthing for category in categories)
    if (names == tuple(config.class_names) and ids == tuple(config.category_ids)
            and num_things == config.num_things_classes):
        return config, None
    if isinstance(config, FastInstConfig) and num_things != len(categories):
        raise ValueError(f"FastInst segments instances only; the training class set has stuff classes "
                         f"({', '.join(c.name for c in categories if not c.isthing)})")
    changes = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in class_head_layers(network):
            parent_name, _, child_name = name.rpartition(".")
            parent = network.get_submodule(parent_name)
            old_layer = getattr(parent, child_name)
            new_layer = _resized_layer(old_layer, len(categories) + 1).to(old_layer.weight.device)
            setattr(parent, child_name, new_layer)
            changes.append(f"{name} {tuple(old_layer.weight.shape)} -> {tuple(new_layer.weight.shape)}")
    if isinstance(config, FastInstConfig):
        network.transformer_decoder.num_classes = \
            network.transformer_decoder.query_proposal.num_classes = len(categories)
        new_config = replace(config, num_classes=len(categories), class_names=names, category_ids=ids)
    else:
        new_config = replace(config, num_things_classes=num_things, num_stuff_classes=len(categories) - num_things,
                             class_names=names, category_ids=ids)
    message = (f"class head re-initialised for a new class set: {config.num_classes} classes -> {len(categories)} "
               f"({num_things} things, {len(categories) - num_things} stuff: {', '.join(names)}); "
               f"{', '.join(changes)}, every other weight loaded strictly from the model directory")
    return new_config, message
