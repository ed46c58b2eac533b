"""Parameter groups and the optimizer built from a ModelScope config.

ModelScope's ``build_optimizer`` passes ``model.parameters()`` as one group; Mask2Former trains the backbone at
0.1 x the learning rate and without weight decay on normalisation layers, embeddings and Swin's position tables.
``train.optimizer.paramwise_options`` takes either form:

- detectron2 Mask2Former's rules (``ParameterGroupConfig``: ``backbone_lr_multiplier``, ``norm_weight_decay``,
  ``embedding_weight_decay``), by module type;
- EasyCV's / mmcv's rules by parameter name: ``{pattern: {option: value}}``, each pattern a regular expression
  searched in the parameter's name (so a plain substring such as ``backbone`` or ``norm`` matches wherever it
  appears), options ``lr`` / ``weight_decay`` (values) and ``lr_mult`` / ``weight_decay_mult`` / ``decay_mult``
  (multiples of the optimizer's own lr / weight decay). Every matching pattern applies, in order, a later one
  overriding an option an earlier one set, as EasyCV's ``build_optimizer`` does.
"""
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from modelscope_plugin.errors import TrainingConfigError
from modelscope_plugin.training.config import ParameterGroupConfig, settings_from

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


# name-rule option -> (the group setting it sets, whether it multiplies the optimizer's own value)
NAME_RULE_OPTIONS = {"lr": ("lr", False), "lr_mult": ("lr", True), "weight_decay": ("weight_decay", False),
                     "weight_decay_mult": ("weight_decay", True), "decay_mult": ("weight_decay", True)}


@dataclass
class NameRule:
    pattern: str
    """A regular expression searched in the parameter name."""
    options: Dict[str, float]
    """``NAME_RULE_OPTIONS`` keys -> values."""


def parameter_rules_from(values: Mapping[str, Any], where: str = "train.optimizer.paramwise_options"
                         ) -> Union[ParameterGroupConfig, List[NameRule]]:
    """``paramwise_options`` in either form (see the module docstring); a ``TrainingConfigError`` names every
    unknown option or bad pattern."""
    values = dict(values or {})
    if not any(isinstance(value, Mapping) for value in values.values()):
        return settings_from(ParameterGroupConfig, values, where)
    rules, problems = [], []
    for pattern, options in values.items():
        if not isinstance(options, Mapping):
            problems.append(f"{pattern!r}: {options!r} is not a mapping of options")
            continue
        unknown = sorted(set(options) - set(NAME_RULE_OPTIONS))
        if unknown:
            problems.append(f"{pattern!r}: unknown options {unknown} (known: {sorted(NAME_RULE_OPTIONS)})")
        try:
            re.compile(pattern)
        except re.error as error:
            problems.append(f"{pattern!r} is not a regular expression ({error})")
        rules.append(NameRule(pattern, {key: float(value) for key, value in options.items()
                                        if key in NAME_RULE_OPTIONS}))
    if problems:
        raise TrainingConfigError(f"{where}: " + "; ".join(problems))
    return rules


def parameter_groups_by_name(network: nn.Module, lr: float, weight_decay: float, rules: Sequence[NameRule],
                             name_of: Callable[[str], str] = str) -> List[Dict[str, Any]]:
    """One group per distinct (lr, weight_decay) after the name rules, matched against ``name_of(parameter name)``;
    the base group first. Frozen parameters are left out."""
    compiled = [(re.compile(rule.pattern), rule.options) for rule in rules]
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for parameter_name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        settings = {"lr": lr, "weight_decay": weight_decay}
        name = name_of(parameter_name)
        for pattern, options in compiled:
            if pattern.search(name):
                for option, value in options.items():
                    setting, multiplies = NAME_RULE_OPTIONS[option]
                    settings[setting] = value * (lr if setting == "lr" else weight_decay) if multiplies else value
        key = (settings["lr"], settings["weight_decay"])
        if key not in groups:
            groups[key] = {"params": [], "lr": key[0], "weight_decay": key[1], "names": []}
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(parameter_name)
    return sorted(groups.values(), key=lambda group: (group["lr"] != lr, group["weight_decay"] != weight_decay))


def build_optimizer(network: nn.Module, optimizer_config: Mapping[str, Any],
                    rules: Union[ParameterGroupConfig, Sequence[NameRule]],
                    name_of: Callable[[str], str] = str) -> torch.optim.Optimizer:
    """``train.optimizer`` = {type: a torch.optim class name, lr, weight_decay, ...other constructor arguments}."""
    values = dict(optimizer_config)
    type_name = values.pop("type", None)
    optimizer_class = getattr(torch.optim, str(type_name), None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"train.optimizer.type {type_name!r} is not a torch.optim optimizer")
    if "lr" not in values:
        raise ValueError("train.optimizer needs an lr")
    lr, weight_decay = float(values.pop("lr")), float(values.pop("weight_decay", 0.0))
    if isinstance(rules, ParameterGroupConfig):
        groups = parameter_groups(network, lr, weight_decay, rules)
    else:
        groups = parameter_groups_by_name(network, lr, weight_decay, rules, name_of)
    for group in groups:
        group.pop("names")
    return optimizer_class(groups, lr=lr, weight_decay=weight_decay, **values)
