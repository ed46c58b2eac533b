"""Overlays coloured by class with a legend, and ModelScope-compatible mask drawing without mmdet."""
from typing import Any, Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .data.categories import COCO_PANOPTIC_PALETTE


def class_color(label_id: int):
    return COCO_PANOPTIC_PALETTE[label_id % len(COCO_PANOPTIC_PALETTE)]


def draw_overlay(rgb: np.ndarray, result: Dict[str, Any], alpha: float = 0.55) -> Image.Image:
    """The image with each segment tinted by its class colour and outlined, plus a legend of labels and scores."""
    canvas = rgb.astype(np.float32).copy()
    for mask, label_id in zip(result["masks"], result["label_ids"]):
        region = mask.astype(bool)
        canvas[region] = (1 - alpha) * canvas[region] + alpha * np.asarray(class_color(label_id), dtype=np.float32)
        # outline: mask pixels with a non-mask 4-neighbour
        border = region & ~(np.roll(region, 1, 0) & np.roll(region, -1, 0) & np.roll(region, 1, 1) & np.roll(region, -1, 1))
        canvas[border] = 255
    overlay = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
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
