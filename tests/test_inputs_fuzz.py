"""Property-based fuzzing of preprocessing and post-processing: random sizes, dtypes and values raise only the
documented ``ImageInputError`` (exactly when the documented rules say the input is invalid), and valid inputs give
masks of the input's size."""
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as numpy_strategies

from modelscope_plugin.config import PreprocessConfig
from modelscope_plugin.errors import ImageInputError
from modelscope_plugin.inference.outputs import build_outputs, postprocess_size
from modelscope_plugin.inference.postprocess import instance_inference, panoptic_inference, semantic_inference
from modelscope_plugin.inference.preprocess import load_image, prepare_image

DTYPES = [np.uint8, np.uint16, np.float16, np.float32, np.float64, np.int8, np.int64, np.bool_, np.complex64]
SHAPES = st.tuples(st.integers(0, 24), st.integers(0, 24)).flatmap(
    lambda size: st.sampled_from([size, size + (1,), size + (2,), size + (3,), size + (4,), size + (3, 1), (size[0],)]))
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def documented_valid(array: np.ndarray) -> bool:
    """preprocessing.load_image's documented rules for arrays."""
    shape = array.shape[:2] if array.ndim == 3 and array.shape[2] == 1 else array.shape
    channels_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if not channels_ok or len(shape) < 2 or 0 in shape[:2]:
        return False
    if array.dtype in (np.uint8, np.uint16):
        return True
    if np.issubdtype(array.dtype, np.floating):
        return bool(np.isfinite(array).all() and array.min() >= 0 and array.max() <= 255)
    return False


@st.composite
def image_arrays(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(SHAPES)
    if np.issubdtype(dtype, np.floating):
        bits = np.finfo(dtype).bits
        elements = (st.floats(0, 255, width=bits) | st.floats(-10, 300, width=bits)
                    | st.sampled_from([np.nan, np.inf, -np.inf]))
        return draw(numpy_strategies.arrays(dtype, shape, elements=elements))
    return draw(numpy_strategies.arrays(dtype, shape))


@FUZZ
@given(array=image_arrays(), short_side=st.integers(1, 48), long_side=st.integers(1, 64),
       divisor=st.sampled_from([1, 4, 32]), backend=st.sampled_from(["cv2", "pil"]))
def test_preprocessing_raises_only_documented_errors(array, short_side, long_side, divisor, backend):
    valid = documented_valid(array)
    try:
        rgb = load_image(array)
    except ImageInputError:
        assert not valid, f"valid {array.dtype} {array.shape} refused"
        return
    assert valid, f"invalid {array.dtype} {array.shape} accepted"
    assert rgb.dtype == np.uint8 and rgb.shape == array.shape[:2] + (3,)
    config = PreprocessConfig(short_side=short_side, long_side_max=long_side, size_divisor=divisor, resize_backend=backend)
    prepared = prepare_image(rgb, config)
    resized_height, resized_width = prepared.resized_size
    padded_height, padded_width = prepared.padded_size
    assert prepared.original_size == rgb.shape[:2] and resized_height >= 1 and resized_width >= 1
    assert padded_height % divisor == 0 and padded_width % divisor == 0
    assert 0 <= padded_height - resized_height < divisor and 0 <= padded_width - resized_width < divisor
    assert torch.isfinite(prepared.tensor).all()
    assert (prepared.tensor[:, resized_height:] == 0).all() and (prepared.tensor[:, :, resized_width:] == 0).all()


@FUZZ
@given(height=st.integers(1, 70), width=st.integers(1, 70), num_queries=st.integers(1, 6), num_classes=st.integers(1, 5),
       things_fraction=st.floats(0, 1), logit_scale=st.sampled_from([0.1, 3.0, 30.0]), seed=st.integers(0, 2 ** 16),
       max_pixels=st.sampled_from([None, 1, 50, 400]), task=st.sampled_from(["panoptic", "semantic", "instance"]),
       threshold=st.floats(0, 1))
def test_postprocessing_gives_masks_of_the_input_size(height, width, num_queries, num_classes, things_fraction, logit_scale,
                                                     seed, max_pixels, task, threshold):
    config = PreprocessConfig(short_side=32, long_side_max=48, size_divisor=32)
    prepared = prepare_image(np.zeros((height, width, 3), np.uint8), config)
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(num_queries, num_classes + 1, generator=generator) * logit_scale
    # stride-4 mask logits of the padded input, as the network returns them
    mask_logits = torch.randn(num_queries, prepared.padded_size[0] // 4, prepared.padded_size[1] // 4, generator=generator) * logit_scale
    num_things = int(round(things_fraction * num_classes))
    sizes = dict(padded_size=prepared.padded_size, resized_size=prepared.resized_size,
                 original_size=postprocess_size(prepared.original_size, max_pixels))
    semantic_map = None
    if task == "panoptic":
        segments = panoptic_inference(class_logits, mask_logits, num_things, **sizes, object_mask_threshold=threshold,
                                      overlap_threshold=threshold, filter_low_score=True).segments
    elif task == "semantic":
        semantic_map, segments = semantic_inference(class_logits, mask_logits, **sizes)
    else:
        segments = instance_inference(class_logits, mask_logits, num_things, **sizes, max_per_image=100,
                                      mask_from_probability=False, score_threshold=0.0)
    names = [f"class_{index}" for index in range(num_classes)]
    outputs = build_outputs(task, segments, names, list(range(1, num_classes + 1)), (height, width), semantic_map)
    masks = outputs["masks"]
    assert all(mask.shape == (height, width) and mask.dtype == np.uint8 and mask.max(initial=0) <= 1 for mask in masks)
    assert len(outputs["labels"]) == len(outputs["scores"]) == len(masks) == len(outputs["boxes"])
    assert all(0.0 <= score <= 1.0 for score in outputs["scores"])
    for mask, (x1, y1, x2, y2) in zip(masks, outputs["boxes"]):
        if mask.any():
            rows, columns = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
    if task == "panoptic":
        assert outputs["panoptic_seg"].shape == (height, width)
        assert not masks or np.stack(masks).sum(0).max() <= 1
        assert all(info["area"] == int(mask.sum()) for info, mask in zip(outputs["segments_info"], masks))
    if task == "semantic":
        assert outputs["sem_seg"].shape == (height, width)
        assert np.stack(masks).sum(0).min() == 1  # every pixel in exactly one class
    if task == "instance":
        assert all(label < num_things for label in outputs["label_ids"])
