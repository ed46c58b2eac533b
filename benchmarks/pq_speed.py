"""PQ and mIoU time on generated 640x480 pairs: this package's streamed accumulators vs hotcoco's ``pq_compute``.

    .venv/bin/python benchmarks/pq_speed.py --pairs 300

Writes ground truth and predictions as COCO panoptic PNG folders + JSON (hotcoco reads those), then times, in the
same run: hotcoco.panoptic.pq_compute on the folders; this package's folder-to-folder entry point
``accumulate_folders`` (hotcoco's matcher when installed, the default) and its streamed matcher on the same PNGs
(``use_hotcoco=False``, the path evaluate() takes with in-memory predictions); and the semantic ConfusionMatrix on
the category maps. Checks the PQ numbers agree.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES
from modelscope_plugin.data.datasets import id_to_rgb
from modelscope_plugin.evaluation import ConfusionMatrix
from modelscope_plugin.evaluation.panoptic_quality import accumulate_folders

HEIGHT, WIDTH = 480, 640


def random_scene(generator: np.random.Generator, segment_count: int):
    """(H, W) id map of rectangles over a stuff background, and its segments_info."""
    ids = np.zeros((HEIGHT, WIDTH), np.int64)
    segments = []
    for segment_id in range(1, segment_count + 1):
        category = COCO_PANOPTIC_CATEGORIES[int(generator.integers(len(COCO_PANOPTIC_CATEGORIES)))]
        top, left = generator.integers(0, HEIGHT - 20), generator.integers(0, WIDTH - 20)
        height, width = generator.integers(20, HEIGHT // 2), generator.integers(20, WIDTH // 2)
        ids[top:top + height, left:left + width] = segment_id
        segments.append({"id": segment_id, "category_id": category.id, "iscrowd": 0})
    present = set(np.unique(ids).tolist())
    return ids, [segment for segment in segments if segment["id"] in present]


def perturb(generator: np.random.Generator, ids: np.ndarray, segments):
    shifted = np.roll(ids, shift=(int(generator.integers(-8, 9)), int(generator.integers(-8, 9))), axis=(0, 1))
    relabelled = [dict(segment) for segment in segments]
    for segment in relabelled:
        if generator.random() < 0.2:
            segment["category_id"] = COCO_PANOPTIC_CATEGORIES[int(generator.integers(len(COCO_PANOPTIC_CATEGORIES)))].id
    present = set(np.unique(shifted).tolist())
    return shifted, [segment for segment in relabelled if segment["id"] in present]


def write_split(folder: Path, scenes, json_path: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    annotations, images = [], []
    for index, (ids, segments) in enumerate(scenes):
        name = f"{index:06d}.png"
        Image.fromarray(id_to_rgb(ids)).save(folder / name)
        annotations.append({"image_id": index, "file_name": name, "segments_info": segments})
        images.append({"id": index, "file_name": f"{index:06d}.jpg", "height": HEIGHT, "width": WIDTH})
    categories = [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in COCO_PANOPTIC_CATEGORIES]
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=300)
    arguments = parser.parse_args()
    generator = np.random.default_rng(0)
    ground_truth = [random_scene(generator, 12) for _ in range(arguments.pairs)]
    predictions = [perturb(generator, ids, segments) for ids, segments in ground_truth]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        write_split(scratch / "gt", ground_truth, scratch / "gt.json")
        write_split(scratch / "pred", predictions, scratch / "pred.json")

        import hotcoco.panoptic

        start = time.perf_counter()
        reference = hotcoco.panoptic.pq_compute(str(scratch / "gt.json"), str(scratch / "pred.json"),
                                                str(scratch / "gt"), str(scratch / "pred"))
        hotcoco_seconds = time.perf_counter() - start

        folders = (str(scratch / "gt.json"), str(scratch / "pred.json"), str(scratch / "gt"), str(scratch / "pred"))
        start = time.perf_counter()
        ours = accumulate_folders(*folders).summarize()
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        streamed = accumulate_folders(*folders, use_hotcoco=False).summarize()
        streamed_seconds = time.perf_counter() - start

        category_index = {c.id: index for index, c in enumerate(COCO_PANOPTIC_CATEGORIES)}
        start = time.perf_counter()
        confusion = ConfusionMatrix(number_of_classes=len(COCO_PANOPTIC_CATEGORIES), ignore_label=255)
        for (gt_ids, gt_segments), (pred_ids, pred_segments) in zip(ground_truth, predictions):
            def to_classes(ids, segments):
                lookup = np.full(ids.max() + 1, 255, np.int64)
                for segment in segments:
                    lookup[segment["id"]] = category_index[segment["category_id"]]
                return lookup[ids]
            confusion.add_image(to_classes(gt_ids, gt_segments), to_classes(pred_ids, pred_segments))
        confusion.summarize()
        miou_seconds = time.perf_counter() - start

    print(f"{arguments.pairs} pairs of {WIDTH}x{HEIGHT}")
    print(f"hotcoco pq_compute (reads PNGs):        {hotcoco_seconds:.2f} s, PQ {reference['All']['pq'] * 100:.4f}")
    print(f"modelscope_plugin accumulate_folders:   {ours_seconds:.2f} s, PQ {ours['PQ']:.4f}, "
          f"ratio to hotcoco {ours_seconds / hotcoco_seconds:.2f}")
    print(f"  streamed matcher (use_hotcoco=False): {streamed_seconds:.2f} s, PQ {streamed['PQ']:.4f}, "
          f"ratio to hotcoco {streamed_seconds / hotcoco_seconds:.2f}")
    for results in (ours, streamed):
        assert abs(results["PQ"] - reference["All"]["pq"] * 100) < 1e-9, (results["PQ"], reference["All"]["pq"])
    print(f"modelscope_plugin mIoU confusion matrix (in-memory maps): {miou_seconds:.2f} s")


if __name__ == "__main__":
    main()
