"""Mask2Former and FastInst for ModelScope pipelines, without mmcv, mmdet, detectron2 or pai-easycv.

``import modelscope_plugin`` registers the Model and Pipeline classes with ModelScope, so that
``pipeline(Tasks.image_segmentation, model='damo/cv_swinL_panoptic-segmentation_cocopan')`` (and the other
supported ids, or a local directory in their layout) runs this package's own code.
"""
__version__ = "0.1.0"

from modelscope_plugin.integration import registry as _registry

_registry.install()
