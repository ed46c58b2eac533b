"""EasyCV's ``Mask2formerPredictor`` for code written against ``easycv.predictors``, without pai-easycv.

``Mask2formerPredictor(model_path, task_mode=...)`` takes an EasyCV ``mask2former_*_export.pth`` (or any checkpoint
``load_model`` reads); calling it on images (paths, BGR arrays, PIL images, or a list) returns one dict per image in
EasyCV's formats:

=============  =====================================================================================================
``panoptic``   ``masks`` (list of (H, W) int32 0/1), ``labels`` (class names), ``labels_ids`` (int64 class indices),
               segments ordered by descending panoptic id (things first, as EasyCV's ``np.unique(...)[::-1]``)
``instance``   ``segms`` (N, H, W) bool, ``bboxes`` (N, 4) float32 x1, y1, x2, y2, ``scores`` (N,) float32,
               ``labels`` (N,) int64 class indices: the top ``max_per_image`` detections, unthresholded
``semantic``   ``seg_pred`` (H, W) int64 class map
=============  =====================================================================================================

``show_panoptic`` / ``show_instance`` / ``show_semantic`` draw as EasyCV 0.11.7 does, on a BGR uint8 image: masks
blended at alpha 0.8 in the palette colour of their class, taken as it is (RGB values written into BGR channels, as
EasyCV does; a second mask of the same colour is shifted by a random offset of at most 30 per channel from numpy's
global random state); semantic maps blended at ``alpha`` (0.5) with the palette turned to BGR; instances above
``score_thr`` also get a green 1-pixel box and a green label box with the class name in white. EasyCV writes labels in
its bundled SimHei font; ``font_path`` selects a TrueType font (default: Pillow's own, so text pixels differ unless
that font is given). The palette is the export's ``PALETTE``, else COCO panoptic's for 133 classes, else EasyCV's
fallback (random colours from seed 42). Unlike EasyCV, the image passed in is not modified: a drawn copy is returned.
"""
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from modelscope_plugin.checkpoints.io import read_checkpoint
from modelscope_plugin.config import TASKS
from modelscope_plugin.data.categories import COCO_PANOPTIC_PALETTE
from modelscope_plugin.errors import ModelDirError
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.model_dirs.load import load_model

MASK_ALPHA = 0.8
"""EasyCV's ``draw_masks`` opacity."""
COLOR_SHIFT = 30
"""EasyCV's ``_get_bias_color``: a repeated colour moves by up to this much per channel."""
BOX_COLOR = (0, 255, 0)
"""mmcv's "green" in BGR: boxes and label backgrounds."""
LABEL_FONT_SIZE = 20


class Mask2formerPredictor:
    """``easycv.predictors.Mask2formerPredictor`` (see the module docstring). ``device``: "cpu", "cuda", ...
    (default: the GPU when there is one, as EasyCV); ``class_names``: for a checkpoint that records none;
    ``font_path``: the TrueType font of the instance labels."""

    def __init__(self, model_path, config_file=None, batch_size: int = 1, device: Optional[str] = None,
                 task_mode: str = "panoptic", class_names: Optional[Sequence[str]] = None,
                 font_path: Optional[str] = None, **kwargs):
        if task_mode not in TASKS:
            raise ModelDirError(f"task_mode must be one of {', '.join(TASKS)}, not {task_mode!r}")
        if config_file is not None:
            raise ModelDirError(f"config_file {config_file}: the configuration is read from {model_path} itself")
        self.task_mode = task_mode
        self.batch_size = batch_size
        self.font_path = font_path
        self.config, network = load_model(model_path, task=task_mode, class_names=class_names)
        if device is None:  # as EasyCV: the GPU when there is one
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor(network.to(device), self.config, device=device)
        self.CLASSES = list(self.config.class_names)
        self.class_name = self.CLASSES
        self.PALETTE = _export_palette(Path(model_path), len(self.CLASSES))

    def __call__(self, inputs) -> List[Dict[str, Any]]:
        images = inputs if isinstance(inputs, list) else [inputs]
        parameters = self.predictor.parameters(task=self.task_mode, score_thr=0.0)
        results = self.predictor.predict_list(images, parameters, batch_size=self.batch_size)
        return [self._easycv_output(result) for result in results]

    def _easycv_output(self, result: Dict[str, Any]) -> Dict[str, Any]:
        if self.task_mode == "semantic":
            return {"seg_pred": np.asarray(result["sem_seg"]).astype(np.int64)}
        if self.task_mode == "instance":
            height, width = np.asarray(result["masks"][0]).shape if result["masks"] else (0, 0)
            return {"segms": np.stack([np.asarray(mask).astype(bool) for mask in result["masks"]])
                    if result["masks"] else np.zeros((0, height, width), dtype=bool),
                    "bboxes": np.asarray(result["boxes"], dtype=np.float32).reshape(-1, 4),
                    "scores": np.asarray(result["scores"], dtype=np.float32),
                    "labels": np.asarray(result["label_ids"], dtype=np.int64)}
        return {"masks": [np.asarray(mask).astype(np.int32) for mask in result["masks"]],
                "labels": list(result["labels"]), "labels_ids": np.asarray(result["label_ids"], dtype=np.int64)}

    # ------------------------------------------------------------------------------------------------ drawing
    def _palette(self) -> np.ndarray:
        """(classes, 3): the export's palette, else EasyCV's fallback of random colours from seed 42."""
        if self.PALETTE is not None:
            return np.asarray(self.PALETTE)
        state = np.random.get_state()
        np.random.seed(42)
        palette = np.random.randint(0, 255, size=(len(self.CLASSES), 3))
        np.random.set_state(state)
        return palette

    def show_panoptic(self, img: np.ndarray, masks, labels_ids, **kwargs) -> np.ndarray:
        """``img`` (H, W, 3) BGR uint8 with each mask blended in its class colour."""
        return draw_masks(img, masks, self._palette()[np.asarray(labels_ids)])

    def show_instance(self, img: np.ndarray, segms, bboxes, scores, labels, score_thr: float = 0.5) -> np.ndarray:
        """``img`` with the detections scoring above ``score_thr`` (all when it is 0) blended in their class colour,
        boxed and labelled."""
        segms, bboxes, labels = np.asarray(segms), np.asarray(bboxes), np.asarray(labels)
        if score_thr > 0:
            kept = np.asarray(scores) > score_thr
            segms, bboxes, labels = segms[kept], bboxes[kept, :], labels[kept]
        drawn = draw_masks(img, segms, self._palette()[labels])
        return draw_boxes(drawn, bboxes, [self.CLASSES[label] for label in labels], self.font_path)

    def show_semantic(self, img: np.ndarray, seg_pred, alpha: float = 0.5, palette=None) -> np.ndarray:
        """``img`` blended at ``alpha`` with the class colours of ``seg_pred`` (palette RGB, turned to BGR)."""
        palette = np.array(self._palette() if palette is None else palette)
        if palette.shape != (len(self.CLASSES), 3):
            raise ValueError(f"palette has shape {palette.shape}; expected ({len(self.CLASSES)}, 3)")
        if not 0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], not {alpha}")
        seg_pred = np.asarray(seg_pred)
        color_seg = np.zeros((seg_pred.shape[0], seg_pred.shape[1], 3), dtype=np.uint8)
        for label, color in enumerate(palette):
            color_seg[seg_pred == label, :] = color
        color_seg = color_seg[..., ::-1]  # RGB palette -> BGR image
        return (np.asarray(img) * (1 - alpha) + color_seg * alpha).astype(np.uint8)


def _export_palette(model_path: Path, num_classes: int) -> Optional[np.ndarray]:
    """An EasyCV export's ``meta.config.PALETTE`` (or ``meta.PALETTE``), else COCO panoptic's colours for 133
    classes, else None."""
    if model_path.is_file():
        checkpoint = read_checkpoint(model_path)
        meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
        if isinstance(meta, dict):
            config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
            palette = config.get("PALETTE") or meta.get("PALETTE")
            if palette is not None and len(palette) == num_classes:
                return np.asarray(palette)
    return np.asarray(COCO_PANOPTIC_PALETTE) if num_classes == len(COCO_PANOPTIC_PALETTE) else None


def draw_masks(img: np.ndarray, masks, colors: np.ndarray, alpha: float = MASK_ALPHA) -> np.ndarray:
    """EasyCV's ``draw_masks`` on a copy of ``img``: each mask's pixels become ``pixel * (1 - alpha) + colour *
    alpha`` (truncated to uint8); a colour already used is shifted (numpy's global random state) until it is new."""
    drawn = np.array(img, copy=True)
    taken_colors = {0}  # EasyCV's set([0, 0, 0])
    for mask, color in zip(masks, colors):
        color_mask = np.asarray(color)
        while tuple(color_mask) in taken_colors:
            color_mask = np.asarray(color_mask) + np.random.randint(low=-COLOR_SHIFT, high=COLOR_SHIFT + 1, size=3)
            np.clip(color_mask, 0, 255, color_mask)
        taken_colors.add(tuple(color_mask))
        selected = np.asarray(mask).astype(bool)
        drawn[selected] = drawn[selected] * (1 - alpha) + color_mask * alpha
    return drawn


def draw_boxes(img: np.ndarray, bboxes: np.ndarray, labels: Sequence[str], font_path: Optional[str]) -> np.ndarray:
    """EasyCV's ``imshow_bboxes``: green 1-pixel boxes, then per box a filled green label box sized by OpenCV's
    Hershey-duplex text size (scale 0.5) and the label in white, size 20, at its top-left corner."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    drawn = np.ascontiguousarray(img)
    corners = np.asarray(bboxes).astype(np.int32).reshape(-1, 4)
    for x1, y1, x2, y2 in corners:
        cv2.rectangle(drawn, (int(x1), int(y1)), (int(x2), int(y2)), BOX_COLOR, thickness=1)
    font = (ImageFont.truetype(font_path, size=LABEL_FONT_SIZE, encoding="utf-8") if font_path
            else ImageFont.load_default(size=LABEL_FONT_SIZE))
    for (x1, y1, _, _), label in zip(corners, labels):
        label = str(label)
        (text_width, text_height), baseline = cv2.getTextSize(label, cv2.FONT_HERSHEY_DUPLEX, 0.5, 1)
        text_x1, text_y1 = int(x1), max(0, int(y1) - text_height - baseline)
        cv2.rectangle(drawn, (text_x1, text_y1), (text_x1 + text_width, text_y1 + text_height + baseline), BOX_COLOR,
                      cv2.FILLED)
        # PIL draws on RGB: BGR -> RGB -> text -> BGR, as EasyCV's put_text
        canvas = Image.fromarray(cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB))
        ImageDraw.Draw(canvas).text((text_x1, text_y1), label, fill="white", font=font)
        drawn = cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR)
    return drawn
