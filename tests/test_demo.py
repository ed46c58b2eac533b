"""``make demo`` (modelscope_plugin.demo): synthetic scenes and sample photos segmented, overlays and JSON written.
(No trained demo model is shipped yet; once one is, a test here checks it reaches its card's held-out numbers.)"""
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import SHARED_DATA
from modelscope_plugin import demo


def test_demo_with_a_model_directory_writes_overlays_and_json_for_scenes_and_photos(tiny_model_dir, tmp_path):
    output = tmp_path / "demo"
    demo.main(["--model", str(tiny_model_dir), "--output", str(output), "--data", str(SHARED_DATA)])
    scene_images = sorted((output / "scenes").glob("*.png"))
    assert len(scene_images) == demo.NUM_SCENES
    photos = [SHARED_DATA / relative for relative in demo.SAMPLES if (SHARED_DATA / relative).is_file()]
    assert photos, "the shared sample photos are missing"
    model_output = output / tiny_model_dir.name
    for image, folder in [(path, "scenes") for path in scene_images] + [(path, "photos") for path in photos]:
        written = json.loads((model_output / folder / f"{image.stem}.json").read_text())
        height, width = np.asarray(Image.open(image)).shape[:2]
        assert written["segments"], f"no segments for {image}"
        for segment in written["segments"]:
            assert tuple(segment["rle"]["size"]) == (height, width)
            assert mask_utils.decode(segment["rle"]).any()
        overlay = Image.open(model_output / folder / f"{image.stem}_overlay.png")
        assert overlay.width > width and overlay.height >= height  # the image and a legend panel on its right
    # the scenes are written once and reused: a second run keeps the same files
    before = {path.name: path.read_bytes() for path in scene_images}
    demo.main(["--model", str(tiny_model_dir), "--output", str(output), "--data", str(SHARED_DATA)])
    assert {path.name: path.read_bytes() for path in sorted((output / "scenes").glob("*.png"))} == before
