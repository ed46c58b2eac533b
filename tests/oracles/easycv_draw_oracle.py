"""Test oracle: EasyCV 0.11.7's own ``Mask2formerPredictor`` on an export file, its outputs and its drawings.

    .venv-oracle/bin/python tests/oracles/easycv_draw_oracle.py --export EXPORT.pth --image IMG --result OUT.npz

For each task mode (panoptic, instance, semantic) the predictor is built on the export, run on the image (read by
EasyCV as BGR), and its ``show_*`` method draws its own outputs on the BGR image, with numpy's global random state
seeded 0 just before each drawing (``draw_masks`` shifts repeated colours by random offsets). Saved per mode ``m``:
``m_*`` the outputs, ``m_drawing`` the drawn BGR image; plus ``image`` (the BGR pixels) and ``font_path`` (EasyCV's
bundled label font).
"""
import argparse
import functools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import easycv_shim  # noqa: E402  (must run before easycv is imported)

easycv_shim.install()

import mmcv  # noqa: E402
import torch  # noqa: E402

# EasyCV's predictor reads the export with torch.load's old default; the export was written by the calling test
torch.load = functools.partial(torch.load, weights_only=False)

from easycv.core.visualization import image as easycv_image  # noqa: E402
from easycv.predictors.segmentation import Mask2formerPredictor  # noqa: E402


def as_array(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--export", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--result", required=True)
    arguments = parser.parse_args(argv)
    image = mmcv.imread(arguments.image)
    saved = {"image": image, "font_path": np.array(easycv_image._FONT_PATH)}
    for mode in ("panoptic", "instance", "semantic"):
        predictor = Mask2formerPredictor(arguments.export, task_mode=mode, device="cpu")
        model = predictor.model
        model.panoptic_on, model.instance_on, model.semantic_on = (mode == "panoptic", mode == "instance",
                                                                   mode == "semantic")
        output = predictor([arguments.image])[0]
        np.random.seed(0)
        if mode == "panoptic":
            drawing = predictor.show_panoptic(image.copy(), output["masks"], output["labels_ids"])
            saved["panoptic_masks"] = np.stack(output["masks"]) if output["masks"] else np.zeros((0,) + image.shape[:2])
            saved["panoptic_labels_ids"] = as_array(output["labels_ids"])
        elif mode == "instance":
            segms, bboxes = as_array(output["segms"]), as_array(output["bboxes"])
            scores, labels = as_array(output["scores"]), as_array(output["labels"])
            drawing = predictor.show_instance(image.copy(), segms, bboxes, scores, labels)
            saved.update(instance_segms=segms, instance_bboxes=bboxes, instance_scores=scores,
                         instance_labels=labels)
        else:
            seg_pred = as_array(output["seg_pred"])
            drawing = predictor.show_semantic(image.copy(), seg_pred)
            saved["semantic_seg_pred"] = seg_pred
        saved[f"{mode}_drawing"] = np.asarray(drawing)
    np.savez(arguments.result, **saved)


if __name__ == "__main__":
    main()
