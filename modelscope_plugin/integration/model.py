"""ModelScope ``Model`` wrapping this package's Mask2Former or FastInst, built from a hub-layout model directory."""
from typing import Optional, Sequence, Union

import torch
from modelscope.models.base import TorchModel
from modelscope.models.builder import MODELS
from modelscope.utils.constant import Tasks

from modelscope_plugin.model_dirs.configuration import MODEL_TYPES
from modelscope_plugin.model_dirs.load import load_model
from modelscope_plugin.modeling.fastinst.model import FastInstOutput
from modelscope_plugin.modeling.mask2former.model import Mask2FormerOutput


class SegmentationModel(TorchModel):
    """Every ``configuration.json`` model type in ``model_dirs.configuration.MODEL_TYPES`` (the Swin-L, R50 and
    FastInst hub ids, this package's own ``mask2former``, and ``eomt``), and every layout ``load_model`` reads without
    one (a Hugging Face folder, an EasyCV export, a FastInst release file, a detectron2 ``.pkl``). ``class_names``: the
    classes' names for a checkpoint that records none, ``thing_ids``: its thing classes (``load_model``)."""

    def __init__(self, model_dir: str, *args, task: Optional[str] = None,
                 class_names: Optional[Sequence[str]] = None, thing_ids: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(model_dir, *args, **kwargs)
        self.config, self.network = load_model(model_dir, task=task, class_names=class_names, thing_ids=thing_ids)

    def forward(self, images: torch.Tensor) -> Union[Mask2FormerOutput, FastInstOutput]:
        return self.network(images)


for _type_name in MODEL_TYPES:
    MODELS.register_module(Tasks.image_segmentation, module_name=_type_name, module_cls=SegmentationModel, force=True)
