"""The cards' drawing helpers run without mmdet and draw what ModelScope's own functions draw."""
import numpy as np
import pytest
from conftest import run_oracle

import modelscope_plugin  # noqa: F401


def random_masks(count, height=37, width=53, seed=0):
    labels = np.random.default_rng(seed).integers(0, count, size=(height, width))
    return np.stack([(labels == index).astype(np.uint8) for index in range(count)])


@pytest.mark.oracle
def test_drawing_equals_modelscope_with_mmdet(tmp_path):
    masks = random_masks(133)
    np.savez(tmp_path / "masks.npz", masks=masks)
    run_oracle("draw_oracle.py", tmp_path / "masks.npz", tmp_path / "drawn.npz", 7)
    reference = np.load(tmp_path / "drawn.npz")
    from modelscope.utils.cv.image_utils import panoptic_seg_masks_to_image, semantic_seg_masks_to_image

    np.random.seed(7)
    np.testing.assert_array_equal(panoptic_seg_masks_to_image(list(masks)), reference["panoptic"])
    np.testing.assert_array_equal(semantic_seg_masks_to_image(list(masks)), reference["semantic"])


def test_card_helpers_need_no_mmdet_and_survive_edge_cases():
    import importlib.util

    from modelscope.utils.cv.image_utils import panoptic_seg_masks_to_image, semantic_seg_masks_to_image

    assert importlib.util.find_spec("mmdet") is None
    many = list(random_masks(150))
    drawn = panoptic_seg_masks_to_image(many)
    assert drawn.shape == (37, 53, 3)
    # 150 masks: the 17 beyond the palette still get colours distinct from every other mask
    colors = {tuple(drawn[mask.astype(bool)][0]) for mask in many if mask.any()}
    assert len(colors) == sum(1 for mask in many if mask.any())
    assert semantic_seg_masks_to_image([]).shape == (1, 1, 3)
    assert panoptic_seg_masks_to_image([]).shape == (1, 1, 3)
