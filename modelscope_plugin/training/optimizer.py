"""Parameter groups (detectron2 Mask2Former's ``build_optimizer``) and the optimizer built from a ModelScope config.

ModelScope's ``build_optimizer`` passes ``model.parameters()`` as one group; Mask2Former trains the backbone at
0.1 x the learning rate and without weight decay on normalisation layers, embeddings and Swin's position tables.
"""
from typing import Any, Dict, List, Mapping, Tuple

import torch
from torch import nn

from modelscope_plugin.training.config import ParameterGroupConfig

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.InstanceNorm1d,
              nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm)
POSITION_TABLE_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def parameter_groups(network: nn.Module, lr: float, weight_decay: float,
                     rules: ParameterGroupConfig) -> List[Dict[str, Any]]:
    """One group per distinct (lr, weight_decay); the first group is the non-backbone one with the base lr (the
    one ModelScope's LrSchedulerHook logs). Frozen parameters are left out; each parameter appears once."""
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    seen = set()
    for module_name, module in network.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            group_lr = lr * rules.backbone_lr_multiplier if module_name.split(".")[0] == "backbone" else lr
            group_decay = weight_decay
            if parameter_name in POSITION_TABLE_NAMES:
                group_decay = rules.embedding_weight_decay
            if isinstance(module, NORM_TYPES):
                group_decay = rules.norm_weight_decay
            if isinstance(module, nn.Embedding):
                group_decay = rules.embedding_weight_decay
            key = (group_lr, group_decay)
            if key not in groups:
                groups[key] = {"params": [], "lr": group_lr, "weight_decay": group_decay, "names": []}
            groups[key]["params"].append(parameter)
            groups[key]["names"].append(f"{module_name}.{parameter_name}" if module_name else parameter_name)
    return sorted(groups.values(), key=lambda group: (group["lr"] != lr, -group["weight_decay"]))


def build_optimizer(network: nn.Module, optimizer_config: Mapping[str, Any],
                    rules: ParameterGroupConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` = {type: a torch.optim class name, lr, weight_decay, ...other constructor arguments}."""
    values = dict(optimizer_config)
    type_name = values.pop("type", None)
    optimizer_class = getattr(torch.optim, str(type_name), None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"train.optimizer.type {type_name!r} is not a torch.optim optimizer")
    if "lr" not in values:
        raise ValueError("train.optimizer needs an lr")
    lr, weight_decay = float(values.pop("lr")), float(values.pop("weight_decay", 0.0))
    groups = parameter_groups(network, lr, weight_decay, rules)
    for group in groups:
        group.pop("names")
    return optimizer_class(groups, lr=lr, weight_decay=weight_decay, **values)
