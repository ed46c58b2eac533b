"""Writes the datasets of the finetuning learning check: synthetic scenes relabelled with a class set unlike the demo
models' own, in the COCO-instances and semantic-folder layouts, each also as a corrupted copy (training masks
transposed, held-out split intact).

    python benchmarks/finetune_learning_check.py ROOT [--train-images 200] [--val-images 40]

writes ``ROOT/{instances,instances_transposed,semantic,semantic_transposed}``; train on each with
``modelscope-seg train --data ROOT/instances ...`` (``semantic*``: ``--classes ROOT/classes.txt``).
Classes: things "round" (discs) and "angular" (triangles, squares, stars); stuff "stripes", "gradient", "noise".
Training scenes are of seed 5, held-out scenes of seed 6 (the demo models were trained on seed 0).
"""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from modelscope_plugin.data.synthetic import SceneConfig, write_dataset

THING_OF_SHAPE = {1: 1, 2: 2, 3: 2, 4: 2}  # disc -> round; triangle, square, star -> angular
THINGS = [{"id": 1, "name": "round", "supercategory": "shape"}, {"id": 2, "name": "angular", "supercategory": "shape"}]
# synthetic label values (class index + 1: disc, triangle, square, star, stripes, gradient, noise) -> new values
NEW_LABEL_VALUE = np.array([0, 1, 2, 2, 2, 3, 4, 5], np.uint8)
CLASS_NAMES = ["round", "angular", "stripes", "gradient", "noise"]


def _transposed_rle(segmentation):
    mask = mask_utils.decode(dict(segmentation, counts=segmentation["counts"].encode("ascii")))
    rle = mask_utils.encode(np.asfortranarray(mask.T))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def write_instances(source: Path, target: Path, split: str, transposed: bool) -> None:
    data = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
    for annotation in data["annotations"]:
        annotation["category_id"] = THING_OF_SHAPE[annotation["category_id"]]
        annotation.pop("shape", None)
        if transposed:
            annotation["segmentation"] = _transposed_rle(annotation["segmentation"])
            x, y, width, height = annotation["bbox"]
            annotation["bbox"] = [y, x, height, width]
    data["categories"] = THINGS
    (target / "annotations").mkdir(parents=True, exist_ok=True)
    (target / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    shutil.copytree(source / split, target / "images" / split)


def write_semantic(source: Path, target: Path, split: str, folder: str, transposed: bool) -> None:
    shutil.copytree(source / split, target / "images" / folder)
    labels = target / "annotations" / folder
    labels.mkdir(parents=True)
    for path in sorted((source / "annotations" / f"semantic_{split}").iterdir()):
        values = NEW_LABEL_VALUE[np.asarray(Image.open(path))]
        Image.fromarray(np.ascontiguousarray(values.T if transposed else values)).save(labels / path.name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--train-images", type=int, default=200)
    parser.add_argument("--val-images", type=int, default=40)
    arguments = parser.parse_args(argv)
    root = Path(arguments.root)
    source = root / "synthetic"
    write_dataset(source, "train", arguments.train_images, seed=5, config=SceneConfig())
    write_dataset(source, "val", arguments.val_images, seed=6, config=SceneConfig())
    for transposed in (False, True):
        suffix = "_transposed" if transposed else ""
        write_instances(source, root / f"instances{suffix}", "train", transposed)
        write_instances(source, root / f"instances{suffix}", "val", False)
        write_semantic(source, root / f"semantic{suffix}", "train", "training", transposed)
        write_semantic(source, root / f"semantic{suffix}", "val", "validation", False)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    print(f"wrote {root}/instances, instances_transposed, semantic, semantic_transposed and classes.txt")


if __name__ == "__main__":
    main()
