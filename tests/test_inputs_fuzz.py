"""Property-based fuzzing of preprocessing and post-processing: random sizes, dtypes and values raise only the
documented ``ImageInputError`` (exactly when the documented rules say the input is invalid), and valid inputs give
masks of the input's size; elongated images and tensors in lists (both architectures), and configuration fields of
every wrong type (one ``ModelDirError`` naming the field)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as numpy_strategies

from modelscope_plugin.config import (
    FastInstConfig,
    InferenceConfig,
    Mask2FormerConfig,
    PreprocessConfig,
    ResNetConfig,
    SwinConfig,
)
from modelscope_plugin.errors import ImageInputError, ModelDirError
from modelscope_plugin.inference.outputs import build_outputs, postprocess_size
from modelscope_plugin.inference.postprocess import instance_inference, panoptic_inference, semantic_inference
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.inference.preprocess import load_image, padded_size, prepare_image, rescaled_size
from modelscope_plugin.model_dirs.configuration import INTEGER_MINIMUMS, check_config
from modelscope_plugin.model_dirs.load import load_model

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


@FUZZ
@given(height=st.integers(1, 4000), width=st.integers(1, 4000), short_side=st.integers(16, 800),
       long_side=st.integers(16, 1333), divisor=st.sampled_from([1, 16, 32]), queries=st.integers(0, 300))
def test_padding_leaves_a_stride_16_pixel_per_query_and_no_more_than_needed(height, width, short_side, long_side,
                                                                           divisor, queries):
    """Any aspect ratio (a 1 x 4000 banner included): FastInst's stride-16 map gets a pixel for every query."""
    resized = rescaled_size(height, width, short_side, long_side)
    padded_height, padded_width = padded_size(resized, divisor, queries)
    plain_height, plain_width = padded_size(resized, divisor)
    assert padded_height % divisor == 0 and padded_width % divisor == 0
    assert padded_height >= plain_height >= resized[0] and padded_width >= plain_width >= resized[1]
    assert (padded_height // 16) * (padded_width // 16) >= queries
    if (padded_height, padded_width) != (plain_height, plain_width):  # one divisor less on the grown side is too few
        smaller = ((padded_height - divisor, padded_width) if padded_height > plain_height
                   else (padded_height, padded_width - divisor))
        assert (smaller[0] // 16) * (smaller[1] // 16) < queries


@pytest.fixture(scope="module")
def demo_predictors():
    demo_models = sorted((REPO / "model_cards" / "demo").iterdir())
    return {path.name: Predictor(*reversed(load_model(path))) for path in demo_models}


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(long_side=st.integers(200, 3000), ratio=st.integers(8, 400), tall=st.booleans(),
       model=st.sampled_from(["fastinst_synthetic-shapes", "mask2former_synthetic-shapes"]),
       tensor_position=st.integers(0, 2))
def test_elongated_images_and_a_tensor_in_a_list_with_on_error_return(demo_predictors, long_side, ratio, tall, model,
                                                                     tensor_position):
    """Both architectures answer any aspect ratio at the input's size; a tensor in the list gets its error entry."""
    short_side = max(1, long_side // ratio)
    size = (long_side, short_side) if tall else (short_side, long_side)
    items = [np.full(size + (3,), 128, np.uint8), np.zeros((40, 30, 3), np.uint8)]
    items.insert(tensor_position, torch.zeros(size + (3,), dtype=torch.uint8))
    predictor = demo_predictors[model]
    results = predictor.predict_list(items, predictor.parameters(score_thr=0.0), on_error="return")
    assert results[tensor_position]["error"]["type"] == "ImageInputError"
    assert "Tensor" in results[tensor_position]["error"]["message"]
    answered = [result for index, result in enumerate(results) if index != tensor_position]
    assert answered[0]["masks"] and all(mask.shape == size for mask in answered[0]["masks"])


def wrong_values(declared, name: str):
    """Values of a type other than ``declared`` (a config dataclass field's type), or below an integer's minimum."""
    others = st.sampled_from(["high", None, [1, 2], {"a": 1}, True, 2.5, -3, 0, float("nan")])
    return others.filter(lambda value: not (
        (declared is int and type(value) is int and value >= INTEGER_MINIMUMS.get(name, 1))
        or (declared is float and type(value) in (int, float))
        or (declared is bool and isinstance(value, bool)) or (declared is str and isinstance(value, str))))


SCALAR_FIELDS = [(section, field.name, field.type) for section, instance in
                 (("", FastInstConfig()), ("", Mask2FormerConfig()), ("preprocess", PreprocessConfig()),
                  ("inference", InferenceConfig()), ("backbone", SwinConfig()), ("backbone", ResNetConfig()))
                 for field in dataclasses.fields(instance) if field.type in (int, float, bool, str)]


@FUZZ
@given(data=st.data(), field=st.sampled_from(SCALAR_FIELDS),
       architecture=st.sampled_from([FastInstConfig, Mask2FormerConfig]),
       backbone=st.sampled_from([SwinConfig, ResNetConfig]))
def test_every_config_field_of_a_wrong_type_is_refused_naming_it(data, field, architecture, backbone):
    section, name, declared = field
    config = architecture(backbone=backbone())
    target = getattr(config, section) if section else config
    if name not in {item.name for item in dataclasses.fields(target)}:
        return
    value = data.draw(wrong_values(declared, name))
    if declared is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        value = -abs(value) - 5.0  # a number of the right type but the wrong sign
    changed = dataclasses.replace(target, **{name: value})
    config = dataclasses.replace(config, **{section: changed}) if section else changed
    with pytest.raises(ModelDirError, match=rf"configuration.json: {section + '.' if section else ''}{name}\b"):
        check_config(config, "configuration.json")
