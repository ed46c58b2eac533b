"""ModelScope ``Model`` wrapping this package's Mask2Former or FastInst, built from a hub-layout model directory."""
from typing import Optional, Union

import torch
from modelscope.models.base import TorchModel

from ..model_dir import load_model_dir
from ..modeling.fastinst.model import FastInstOutput
from ..modeling.mask2former.model import Mask2FormerOutput


class Mask2FormerModel(TorchModel):
    """``configuration.json`` model types ``swinL-panoptic-segmentation``, ``swinL-semantic-segmentation``,
    ``r50-panoptic-segmentation`` (and ``mask2former``)."""

    def __init__(self, model_dir: str, *args, task: Optional[str] = None, **kwargs):
        super().__init__(model_dir, *args, **kwargs)
        self.config, self.network = load_model_dir(model_dir, task=task)

    def forward(self, images: torch.Tensor) -> Union[Mask2FormerOutput, FastInstOutput]:
        return self.network(images)


class FastInstModel(Mask2FormerModel):
    """``configuration.json`` model type ``fastinst`` (``damo/cv_resnet50_fast-instance-segmentation_coco``);
    ``load_model_dir`` reads its layout and builds this package's FastInst."""
