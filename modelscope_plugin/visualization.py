"""Overlays coloured by class with a legend, and ModelScope-compatible mask drawing without mmdet."""
from typing import Any, Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from modelscope_plugin.data.categories import COCO_PANOPTIC_PALETTE


def class_color(label_id: int):
    return COCO_PANOPTIC_PALETTE[label_id % len(COCO_PANOPTIC_PALETTE)]


def draw_overlay(rgb: np.ndarray, result: Dict[str, Any], alpha: float = 0.55, legend: bool = True) -> Image.Image:
    """The image with each segment tinted by its class colour and outlined, plus (``legend``) a panel of labels and
    scores on its right."""
    canvas = rgb.astype(np.float32).copy()
    for mask, label_id in zip(result["masks"], result["label_ids"]):
        region = mask.astype(bool)
        canvas[region] = (1 - alpha) * canvas[region] + alpha * np.asarray(class_color(label_id), dtype=np.float32)
        # outline: mask pixels with a non-mask 4-neighbour
        border = region & ~(np.roll(region, 1, 0) & np.roll(region, -1, 0) & np.roll(region, 1, 1)
                            & np.roll(region, -1, 1))
        canvas[border] = 255
    overlay = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if not legend:
        return overlay
    entries = [f"{label} {score:.2f}" for label, score in zip(result["labels"], result["scores"])]
    row_height, legend_width = 14, 8 + 7 * max([len(entry) for entry in entries] + [10]) + 16
    legend = Image.new("RGB", (legend_width, max(overlay.height, row_height * len(entries) + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for row, (entry, label_id) in enumerate(zip(entries, result["label_ids"])):
        top = 4 + row * row_height
        draw.rectangle([4, top + 2, 14, top + 12], fill=class_color(label_id))
        draw.text((18, top), entry, fill=(0, 0, 0))
    combined = Image.new("RGB", (overlay.width + legend.width, legend.height), (255, 255, 255))
    combined.paste(overlay, (0, 0))
    combined.paste(legend, (overlay.width, 0))
    return combined


def segments_to_json(result: Dict[str, Any]) -> Dict[str, Any]:
    """JSON-serialisable result: masks as COCO RLE (pycocotools), everything else as plain lists."""
    from pycocotools import mask as mask_utils

    segments: List[Dict[str, Any]] = []
    for index, mask in enumerate(result["masks"]):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segments.append({
            "label": result["labels"][index], "label_id": result["label_ids"][index],
            "category_id": result["category_ids"][index], "score": result["scores"][index],
            "box": result["boxes"][index], "rle": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        })
    return {"segments": segments}


def _palette_color(index: int) -> np.ndarray:
    return np.asarray(COCO_PANOPTIC_PALETTE[index % len(COCO_PANOPTIC_PALETTE)])


def _empty_canvas(masks: Sequence[np.ndarray]) -> np.ndarray:
    # ModelScope's functions index masks[0]; with no masks there is no size to draw at, so return one black pixel
    return np.zeros((1, 1, 3)) if len(masks) == 0 else np.zeros((masks[0].shape[0], masks[0].shape[1], 3))


def panoptic_seg_masks_to_image(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Same drawing as ``modelscope.utils.cv.image_utils.panoptic_seg_masks_to_image`` without mmdet: mask i gets
    mmdet's 133-colour COCO panoptic palette entry i; a colour already used is jittered by up to ±30 per channel
    with NumPy's global RNG, as mmdet's ``_get_bias_color``. Float64 (H, W, 3), RGB values written as cv2 will read
    them. More than 133 masks wrap around the palette (and get jittered) instead of raising."""
    canvas = _empty_canvas(masks)
    taken = {0}  # ModelScope initialises its set with set([0, 0, 0]) == {0}; kept for identical jitter draws
    for index, mask in enumerate(masks):
        color = tuple(_palette_color(index))
        while color in taken:
            color = tuple(np.clip(np.asarray(color) + np.random.randint(low=-30, high=31, size=3), 0, 255))
        taken.add(color)
        canvas[mask.astype(bool)] = color
    return canvas


def semantic_seg_masks_to_image(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Same drawing as ModelScope's ``semantic_seg_masks_to_image`` without mmdet: mask i in palette colour i."""
    canvas = _empty_canvas(masks)
    for index, mask in enumerate(masks):
        canvas[mask.astype(bool)] = _palette_color(index)
    return canvas
