"""Mask resizing, the per-pixel winner and the instance score threshold: the fast paths equal the reference arithmetic."""
import random

import pytest
import torch
import torch.nn.functional as F

from modelscope_plugin.inference.postprocess import first_argmax, instance_inference, masks_to_original_size


def three_step_resize(logits, padded_size, resized_size, original_size):
    """mmdet / detectron2: upsample to the padded input, crop the padding, resize to the original size."""
    upsampled = F.interpolate(logits[None], size=padded_size, mode="bilinear", align_corners=False)
    cropped = upsampled[:, :, : resized_size[0], : resized_size[1]]
    return F.interpolate(cropped, size=original_size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("seed", range(40))
def test_mask_resizing_equals_the_three_step_reference(seed):
    rng = random.Random(seed)
    height, width = rng.randint(1, 48), rng.randint(1, 48)
    padded = (4 * height, 4 * width)
    resized = (rng.randint(max(1, padded[0] - 31), padded[0]), rng.randint(max(1, padded[1] - 31), padded[1]))
    if seed % 2:  # original no larger than resized: the one-matrix-per-axis path
        original = (rng.randint(1, resized[0]), rng.randint(1, resized[1]))
    else:  # larger: the interpolation path
        original = (rng.randint(resized[0], 3 * resized[0]), rng.randint(resized[1] + 1, 3 * resized[1]))
    logits = torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed)) * 8
    ours = masks_to_original_size(logits, padded, resized, original)
    assert ours.dtype == torch.float32 and ours.shape == (3, *original)
    if seed % 2:
        # the same linear map: within float32 rounding of the exact (float64) three steps, closer than the
        # float32 three steps themselves get (torch's float32 interpolation weights are coarser)
        exact = three_step_resize(logits.double(), padded, resized, original)
        error = (ours.double() - exact).abs().max()
        assert error <= 1e-6 * exact.abs().max()
        assert error <= (three_step_resize(logits, padded, resized, original).double() - exact).abs().max() + 1e-6
    else:
        assert torch.equal(ours, three_step_resize(logits, padded, resized, original))
    assert masks_to_original_size(logits[:0], padded, resized, original).shape == (0, *original)


def test_first_argmax_equals_argmax_with_ties():
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (9, 31, 17), generator=generator).float()  # many ties
    assert torch.equal(first_argmax(values), values.argmax(0))
    values = torch.randn(5, 8, 8, generator=generator)
    assert torch.equal(first_argmax(values), values.argmax(0))
    assert torch.equal(first_argmax(values[:1]), torch.zeros(8, 8, dtype=torch.long))


@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.7])
def test_instance_score_threshold_drops_exactly_the_segments_scoring_below_it(threshold):
    # confident classes for some queries, so the scores straddle every threshold
    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(30, 6, generator=generator) * 3
    mask_logits = torch.randn(30, 12, 16, generator=generator) * 4
    sizes = dict(padded_size=(48, 64), resized_size=(45, 60), original_size=(90, 120))
    everything = instance_inference(class_logits, mask_logits, 4, **sizes, max_per_image=50, mask_from_probability=True,
                                    score_threshold=0.0)
    kept = instance_inference(class_logits, mask_logits, 4, **sizes, max_per_image=50, mask_from_probability=True,
                              score_threshold=threshold)
    expected = [segment for segment in everything if segment.score >= threshold]
    assert 0 < len(expected) < len(everything)
    assert [(s.label, s.score) for s in kept] == [(s.label, s.score) for s in expected]
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(kept, expected))
