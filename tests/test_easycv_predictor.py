"""``modelscope_plugin.apps.easycv_predictor.Mask2formerPredictor``: EasyCV's predictor without pai-easycv.

Against EasyCV 0.11.7's own predictor on the same export file (oracle): its drawings of the same outputs are pixel-equal
for every task mode (with EasyCV's label font), and its outputs agree with EasyCV's. Without the oracle: the blending
rules on hand-built masks."""
import numpy as np
import pytest
from conftest import SHARED_DATA, run_oracle

from modelscope_plugin.apps.easycv_predictor import Mask2formerPredictor, draw_masks
from modelscope_plugin.errors import ModelDirError

IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"


@pytest.fixture(scope="module")
def easycv(tmp_path_factory):
    root = tmp_path_factory.mktemp("easycv_predictor")
    export = root / "mask2former_pan_export.pth"
    run_oracle("easycv_oracle.py", "--backbone", "r50-tiny-test", "--seed", "0", "--model-dir", root / "dir",
               "--export-pth", export)
    run_oracle("easycv_draw_oracle.py", "--export", export, "--image", IMAGE, "--result", root / "draw.npz")
    return export, dict(np.load(root / "draw.npz"))


def draw(predictor, mode, image, saved):
    np.random.seed(0)  # as the oracle, before each drawing
    if mode == "panoptic":
        return predictor.show_panoptic(image.copy(), list(saved["panoptic_masks"]), saved["panoptic_labels_ids"])
    if mode == "instance":
        return predictor.show_instance(image.copy(), saved["instance_segms"], saved["instance_bboxes"],
                                       saved["instance_scores"], saved["instance_labels"])
    return predictor.show_semantic(image.copy(), saved["semantic_seg_pred"])


@pytest.mark.oracle
@pytest.mark.parametrize("mode", ["panoptic", "instance", "semantic"])
def test_drawings_are_pixel_equal_to_easycv_s(easycv, mode):
    export, saved = easycv
    predictor = Mask2formerPredictor(str(export), task_mode=mode, font_path=str(saved["font_path"]))
    drawing = draw(predictor, mode, saved["image"], saved)
    assert drawing.dtype == np.uint8 and drawing.shape == saved["image"].shape
    assert not np.array_equal(drawing, saved["image"])  # something was drawn
    assert np.array_equal(drawing, saved[f"{mode}_drawing"])


@pytest.mark.oracle
def test_outputs_agree_with_easycv_s(easycv):
    export, saved = easycv
    predictor = Mask2formerPredictor(str(export), task_mode="panoptic")
    panoptic = predictor(str(IMAGE))[0]
    assert panoptic["labels_ids"].tolist() == saved["panoptic_labels_ids"].tolist()
    assert panoptic["labels"] == [predictor.CLASSES[index] for index in saved["panoptic_labels_ids"]]
    for ours, theirs in zip(panoptic["masks"], saved["panoptic_masks"]):
        assert ours.dtype == np.int32 and np.mean(ours != theirs) < 1e-3
    semantic = Mask2formerPredictor(str(export), task_mode="semantic")(str(IMAGE))[0]["seg_pred"]
    assert semantic.dtype == np.int64 and np.mean(semantic != saved["semantic_seg_pred"]) < 1e-3
    instance = Mask2formerPredictor(str(export), task_mode="instance")(str(IMAGE))[0]
    order = np.argsort(-saved["instance_scores"], kind="stable")
    confident = saved["instance_scores"][order] > 0.1
    assert instance["labels"][:confident.sum()].tolist() == saved["instance_labels"][order][confident].tolist()
    assert instance["scores"][:confident.sum()] == pytest.approx(saved["instance_scores"][order][confident], abs=1e-4)
    assert instance["segms"].dtype == bool and instance["bboxes"].shape == (len(instance["scores"]), 4)


def test_masks_blend_at_0_8_truncated_and_a_repeated_colour_moves_by_numpy_s_random_offset():
    image = np.full((2, 3, 3), 101, dtype=np.uint8)
    masks = [np.array([[1, 0, 0], [0, 0, 0]]), np.array([[0, 1, 0], [0, 0, 0]]), np.array([[0, 0, 0], [0, 0, 1]])]
    colors = np.array([[10, 20, 250], [10, 20, 250], [0, 0, 0]])
    np.random.seed(5)
    offset = np.random.randint(low=-30, high=31, size=3)
    np.random.seed(5)
    drawn = draw_masks(image, masks, colors)
    # 101 * 0.2 + c * 0.8, truncated: 28.2 -> 28, 36.2 -> 36, 220.2 -> 220
    assert drawn[0, 0].tolist() == [28, 36, 220]
    shifted = np.clip(colors[1] + offset, 0, 255)
    assert drawn[0, 1].tolist() == [int(101 * 0.2 + value * 0.8) for value in shifted]
    # black is never "taken" (EasyCV's set([0, 0, 0]) holds only 0): 101 * 0.2 = 20.2 -> 20
    assert drawn[1, 2].tolist() == [20, 20, 20]
    assert drawn[1, 0].tolist() == [101, 101, 101] and image[0, 0].tolist() == [101, 101, 101]


def test_unknown_task_mode_is_refused_naming_it():
    with pytest.raises(ModelDirError, match="task_mode must be one of panoptic, semantic, instance, not 'depth'"):
        Mask2formerPredictor("unused.pth", task_mode="depth")
