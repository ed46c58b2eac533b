"""``load_model``: any supported checkpoint layout -> (configuration, network with strictly loaded weights).

Hub-layout directories (``configuration.json``) go by their model type to ``mask2former.py`` (mmdet, EasyCV and
this package's own layout), ``fastinst.py``, ``eomt.py`` or ``oneformer.py`` (an HF EoMT / OneFormer folder beside
the configuration.json); Hugging Face folders (``config.json``) by its ``model_type`` to ``eomt.py`` ("eomt",
"eomt_dinov3"), ``oneformer.py`` ("oneformer") or ``hf.py`` (Mask2Former); single files (EasyCV exports, FastInst
releases, detectron2 Mask2Former ``model_final_*.pkl``) by what their weights hold.
"""
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch

from modelscope_plugin.checkpoints.io import read_checkpoint
from modelscope_plugin.config import EomtConfig, FastInstConfig, Mask2FormerConfig, OneFormerConfig
from modelscope_plugin.errors import ModelDirError
from modelscope_plugin.model_dirs.configuration import MODEL_TYPES, read_configuration_json
from modelscope_plugin.model_dirs.detectron2 import is_detectron2_mask2former, load_detectron2_checkpoint
from modelscope_plugin.model_dirs.eomt import load_hf_eomt_dir
from modelscope_plugin.model_dirs.fastinst import is_fastinst_state_dict, load_fastinst_checkpoint, load_fastinst_dir
from modelscope_plugin.model_dirs.hf import load_hf_model_dir, read_hf_config
from modelscope_plugin.model_dirs.mask2former import load_easycv_export, load_mask2former_dir
from modelscope_plugin.model_dirs.oneformer import load_hf_oneformer_dir

LoadedModel = Tuple[Union[Mask2FormerConfig, FastInstConfig, EomtConfig, OneFormerConfig], torch.nn.Module]


def load_model_dir(model_dir, task: Optional[str] = None) -> LoadedModel:
    """Builds the network a hub-layout model directory describes and loads its weights strictly."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    configuration = read_configuration_json(model_dir)
    model_type = configuration.get("model", {}).get("type")
    if model_type not in MODEL_TYPES:
        raise ModelDirError(f"{model_dir}: model type {model_type!r} is not a model this package runs "
                            f"(supported: {', '.join(sorted(MODEL_TYPES))})")
    if model_type == "fastinst":
        return load_fastinst_dir(model_dir, configuration, task=task)
    if model_type == "eomt":
        # a Hugging Face EoMT folder (config.json + weights) with a configuration.json for ModelScope
        return load_hf_eomt_dir(model_dir, task=task, configuration=configuration["model"].get("config"))
    if model_type == "oneformer":
        # a Hugging Face OneFormer folder with a configuration.json for ModelScope
        return load_hf_oneformer_dir(model_dir, task=task, configuration=configuration["model"].get("config"))
    return load_mask2former_dir(model_dir, configuration, MODEL_TYPES[model_type](), task=task)


def with_names(loaded: LoadedModel, class_names: Optional[Tuple[str, ...]], path: Path) -> LoadedModel:
    """``loaded`` with its class names replaced by ``class_names`` (when given; as many as the model has classes)."""
    config, network = loaded
    if class_names is None:
        return loaded
    if len(class_names) != config.num_classes:
        raise ModelDirError(f"{path}: {len(class_names)} class names given for its {config.num_classes} classes")
    return replace(config, class_names=class_names), network


def refuse_thing_ids(thing_ids: Optional[Sequence[int]], path: Path) -> None:
    """Thing ids are for the layouts that do not record which classes are things; the others refuse them."""
    if thing_ids is not None:
        raise ModelDirError(f"{path}: thing ids are taken only for checkpoints that do not record which classes are "
                            "things (a detectron2 .pkl, a Hugging Face Mask2Former folder)")


def load_model(path, task: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
               thing_ids: Optional[Sequence[int]] = None) -> LoadedModel:
    """Any supported layout: a hub-layout directory (Mask2Former or FastInst), a Hugging Face folder (Mask2Former,
    EoMT or OneFormer), an EasyCV export file, an official FastInst release file or a detectron2 Mask2Former ``.pkl``.

    ``class_names``: the names of the model's classes in class order, for checkpoints that record none (a detectron2
    ``.pkl`` of a class set without a built-in table); where the checkpoint names its classes, these replace them.
    ``thing_ids``: the class indices that are things, for the sources that do not record it (detectron2 ``.pkl``,
    Hugging Face Mask2Former folders; ``model_dirs.classes.things_first``)."""
    path = Path(path)
    if class_names is not None:
        class_names = tuple(str(name) for name in class_names)
    if path.is_dir() and (path / "configuration.json").is_file():
        refuse_thing_ids(thing_ids, path)
        return with_names(load_model_dir(path, task=task), class_names, path)
    if path.is_dir() and (path / "config.json").is_file():
        model_type = read_hf_config(path).get("model_type")
        if model_type in ("eomt", "eomt_dinov3"):
            refuse_thing_ids(thing_ids, path)
            return with_names(load_hf_eomt_dir(path, task=task), class_names, path)
        if model_type == "oneformer":
            refuse_thing_ids(thing_ids, path)
            return with_names(load_hf_oneformer_dir(path, task=task), class_names, path)
        return load_hf_model_dir(path, task=task, class_names=class_names, thing_ids=thing_ids)
    if path.is_file():
        checkpoint = read_checkpoint(path)
        if is_fastinst_state_dict(checkpoint):
            refuse_thing_ids(thing_ids, path)
            return with_names(load_fastinst_checkpoint(path, checkpoint, task=task), class_names, path)
        if is_detectron2_mask2former(checkpoint):
            return load_detectron2_checkpoint(path, checkpoint, task=task, class_names=class_names,
                                              thing_ids=thing_ids)
        refuse_thing_ids(thing_ids, path)
        return load_easycv_export(path, task=task, checkpoint=checkpoint, class_names=class_names)
    raise ModelDirError(f"{path} is neither a model directory (configuration.json or config.json) "
                        "nor a checkpoint file")
