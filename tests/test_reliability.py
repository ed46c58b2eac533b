"""Issue 24's reliability items: each bad or unusual input that used to escape as a raw Python error, a traceback
or a wait now gets its answer or the package's own one-line error."""
import numpy as np
import pytest
import torch
from conftest import REPO
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks

from modelscope_plugin.errors import ImageInputError
from modelscope_plugin.inference.preprocess import padded_size

DEMO_MODELS = sorted((REPO / "model_cards" / "demo").iterdir())


@pytest.fixture(scope="module", params=DEMO_MODELS, ids=lambda path: path.name)
def demo_segmenter(request):
    return pipeline(Tasks.image_segmentation, model=str(request.param), device="cpu")


def banner(height: int, width: int) -> np.ndarray:
    """An elongated BGR image: a white disc on grey at each end."""
    image = np.full((height, width, 3), 96, np.uint8)
    rows, columns = np.ogrid[:height, :width]
    radius = min(height, width) // 3
    for row, column in ((height // 2, width // 2), (radius + 1, radius + 1), (height - radius - 2, width - radius - 2)):
        image[(rows - row) ** 2 + (columns - column) ** 2 <= radius ** 2] = 255
    return image


ELONGATED_SIZES = [(100, 1200), (1200, 100), (10, 3000), (3000, 8)]


@pytest.mark.parametrize("size", ELONGATED_SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_elongated_images_are_answered_at_their_size(demo_segmenter, size):
    """FastInst picks its queries among stride-16 pixels: an 11:1 banner used to leave fewer pixels than queries."""
    result = demo_segmenter(banner(*size), score_thr=0.0)
    assert result["masks"], "every query scores above 0"
    assert all(mask.shape == size for mask in result["masks"])


def test_elongated_images_and_a_tensor_inside_a_list_with_on_error_return(demo_segmenter):
    items = [banner(100, 1200), torch.zeros(3, 64, 64), banner(1200, 100)]
    results = demo_segmenter(items, on_error="return", score_thr=0.0)
    assert "error" not in results[0] and "error" not in results[2]
    assert results[0]["masks"][0].shape == (100, 1200) and results[2]["masks"][0].shape == (1200, 100)
    error = results[1]["error"]
    assert error["type"] == "ImageInputError" and error["index"] == 1
    assert "Tensor((3, 64, 64), torch.float32)" in error["input"] and "Tensor((3, 64, 64), torch.float32)" in error["message"]


def test_a_tensor_alone_is_one_image_error_naming_it(demo_segmenter):
    with pytest.raises(ImageInputError, match=r"Tensor\(\(64, 64, 3\), torch.uint8\).*tensor: convert it"):
        demo_segmenter(torch.zeros(64, 64, 3, dtype=torch.uint8))


@pytest.mark.parametrize("resized_size, divisor, minimum, expected", [
    ((29, 352), 32, 50, (64, 352)),  # 2 x 22 = 44 stride-16 pixels < 50: the short side grows by one divisor
    ((352, 29), 32, 50, (352, 64)),
    ((29, 352), 32, 0, (32, 352)),   # Mask2Former: only the size divisor
    ((1, 1), 1, 4, (32, 32)),
    ((800, 1333), 32, 100, (800, 1344)),  # a normal image is padded as before
])
def test_padded_size_leaves_a_stride_16_pixel_per_query(resized_size, divisor, minimum, expected):
    assert padded_size(resized_size, divisor, minimum) == expected
