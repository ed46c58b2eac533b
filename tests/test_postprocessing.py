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


# Hand-built cases for each threshold. Masks are given at the output size (padded = resized = original), where the
# resize is the identity, so every pixel's logit is the one written here; class logits are log-probabilities, so
# the softmax gives back the probabilities written here. Expected results follow mmdet 2.x's
# ``MaskFormerFusionHead.panoptic_postprocess`` / ``instance_postprocess`` rules, worked out by hand.
import math

import numpy as np

from modelscope_plugin.inference.postprocess import panoptic_inference

SIZE = (4, 6)
SAME_SIZE = dict(padded_size=SIZE, resized_size=SIZE, original_size=SIZE)
NUM_THINGS = 2  # classes 0, 1 are things, 2 is stuff, 3 is "no object"


def class_logits_for(rows):
    """[(class, probability), ...] -> (Q, 4) logits whose softmax puts that probability on that class and spreads
    the rest evenly over the other three."""
    logits = torch.empty(len(rows), 4, dtype=torch.float64)
    for query, (label, probability) in enumerate(rows):
        logits[query] = math.log((1 - probability) / 3)
        logits[query, label] = math.log(probability)
    return logits.float()


def columns_mask(columns, inside=10.0, outside=-10.0):
    mask = torch.full(SIZE, outside)
    mask[:, columns] = inside
    return mask


# the references' defaults (mmdet 2.x test_cfg / detectron2), written here rather than read from the package
REFERENCE_PANOPTIC = dict(object_mask_threshold=0.8, overlap_threshold=0.8, filter_low_score=True)
REFERENCE_INSTANCE = dict(max_per_image=100, mask_from_probability=False, score_threshold=0.0)


def panoptic(rows, masks, **thresholds):
    segments = panoptic_inference(class_logits_for(rows), torch.stack(masks), NUM_THINGS, **SAME_SIZE,
                                  **{**REFERENCE_PANOPTIC, **thresholds}).segments
    return [(segment.label, round(segment.score, 5), segment.isthing, segment.mask.nonzero()[:, 1].unique().tolist(),
             int(segment.mask.sum())) for segment in segments]


def test_object_mask_threshold_keeps_queries_whose_best_class_probability_exceeds_it():
    # a thing at 0.9 on the left half, a stuff query at 0.7 on the right half
    rows, masks = [(0, 0.9), (2, 0.7)], [columns_mask([0, 1, 2]), columns_mask([3, 4, 5])]
    assert panoptic(rows, masks, object_mask_threshold=0.8) == [(0, 0.9, True, [0, 1, 2], 12)]
    # both kept; order = descending panoptic id: the thing (0 + 1 * 1000) before the stuff (2)
    assert panoptic(rows, masks, object_mask_threshold=0.6) == [(0, 0.9, True, [0, 1, 2], 12), (2, 0.7, False, [3, 4, 5], 12)]
    assert panoptic(rows, masks, object_mask_threshold=0.95) == []
    # strictly greater: a query at exactly the threshold is dropped (other logits at -1e4: softmax gives exactly 1.0)
    certain = torch.tensor([[0.0, -1e4, -1e4, -1e4]])
    assert F.softmax(certain, -1)[0, 0].item() == 1.0
    assert panoptic_inference(certain, masks[0][None], NUM_THINGS, **SAME_SIZE,
                              **{**REFERENCE_PANOPTIC, "object_mask_threshold": 1.0}).segments == []
    assert len(panoptic_inference(certain, masks[0][None], NUM_THINGS, **SAME_SIZE,
                                  **{**REFERENCE_PANOPTIC, "object_mask_threshold": 0.99}).segments) == 1
    # the "no object" class never makes a segment, however confident
    assert panoptic([(3, 0.99), (0, 0.9)], masks, object_mask_threshold=0.5) == [(0, 0.9, True, [3, 4, 5], 12)]


def test_overlap_threshold_drops_a_query_that_wins_too_little_of_its_own_mask():
    # A (0.95) covers columns 0-3, B (0.9) covers 2-5: A wins the shared columns 2-3 (higher score), so B wins
    # 2 of its 4 columns: ratio 0.5
    rows, masks = [(0, 0.95), (1, 0.9)], [columns_mask([0, 1, 2, 3]), columns_mask([2, 3, 4, 5])]
    a = (0, 0.95, True, [0, 1, 2, 3], 16)
    assert panoptic(rows, masks, overlap_threshold=0.8) == [a]
    assert panoptic(rows, masks, overlap_threshold=0.4) == [(1, 0.9, True, [4, 5], 8), a]  # B's id is 1 + 2 * 1000
    # a ratio exactly at the threshold is kept (mmdet drops only ratio < threshold)
    assert panoptic(rows, masks, overlap_threshold=0.5) == [(1, 0.9, True, [4, 5], 8), a]
    # and the winner is the highest score * mask probability, not the highest score: B's mask is surer on column 3
    masks = [columns_mask([0, 1, 2, 3], inside=0.5), columns_mask([2, 3, 4, 5])]
    assert panoptic(rows, masks, overlap_threshold=0.4) == [(1, 0.9, True, [2, 3, 4, 5], 16), (0, 0.95, True, [0, 1], 8)]


def test_filter_low_score_keeps_only_pixels_where_the_segment_own_mask_is_confident():
    # one query: sure on columns 0-3 (probability ~1), unsure on 4-5 (logit -1: probability 0.27 < 0.5) but it is the
    # only query, so it wins every pixel; its won area / own area = 24 / 16 >= 0.8
    mask = columns_mask([0, 1, 2, 3], outside=-1.0)
    assert panoptic([(2, 0.9)], [mask], filter_low_score=True) == [(2, 0.9, False, [0, 1, 2, 3], 16)]
    assert panoptic([(2, 0.9)], [mask], filter_low_score=False) == [(2, 0.9, False, [0, 1, 2, 3, 4, 5], 24)]


def test_panoptic_scores_are_the_class_probabilities_and_stuff_merges_take_the_highest():
    rows = [(0, 0.83), (1, 0.91), (2, 0.87), (2, 0.97)]
    masks = [columns_mask([0]), columns_mask([1, 2]), columns_mask([3]), columns_mask([4, 5])]
    assert panoptic(rows, masks) == [(1, 0.91, True, [1, 2], 8), (0, 0.83, True, [0], 4), (2, 0.97, False, [3, 4, 5], 12)]


def instances(rows, masks, **options):
    segments = instance_inference(class_logits_for(rows), torch.stack(masks), NUM_THINGS, **SAME_SIZE,
                                  **{**REFERENCE_INSTANCE, **options})
    return [(segment.label, round(segment.score, 5), int(segment.mask.sum())) for segment in segments]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_instance_masks_are_positive_logits_and_scores_their_mean_probability():
    # graded logits: the mask is logit > 0 (mmdet), probability > 0.5 is the same set; the score is the class
    # probability times the mean sigmoid over the mask's pixels
    mask = torch.tensor([[3.0, 1.5, 0.5, 0.2, -0.3, -4.0]]).repeat(4, 1)
    expected_score = 0.9 * (sigmoid(3.0) + sigmoid(1.5) + sigmoid(0.5) + sigmoid(0.2)) / 4
    for from_probability in (False, True):
        result = instance_inference(class_logits_for([(1, 0.9)]), mask[None], NUM_THINGS, **SAME_SIZE, max_per_image=1,
                                    mask_from_probability=from_probability, score_threshold=0.0)
        assert len(result) == 1 and result[0].label == 1
        assert result[0].mask.tolist() == (mask > 0).tolist()
        assert abs(result[0].score - expected_score) < 1e-6


def test_max_per_image_takes_the_top_query_class_pairs_before_dropping_stuff():
    # pairs by class probability: (q0, thing 0) 0.7, (q1, stuff 2) 0.6, (q2, thing 1) 0.5, then each query's
    # remaining classes at (1 - p) / 3 = 0.1, 0.133, 0.167
    rows = [(0, 0.7), (2, 0.6), (1, 0.5)]
    masks = [columns_mask([0, 1]), columns_mask([2, 3]), columns_mask([4, 5])]
    inside = sigmoid(10.0)
    assert instances(rows, masks, max_per_image=1) == [(0, round(0.7 * inside, 5), 8)]
    # the second pair is stuff: dropped, not replaced by the next thing
    assert instances(rows, masks, max_per_image=2) == [(0, round(0.7 * inside, 5), 8)]
    assert instances(rows, masks, max_per_image=3) == [(0, round(0.7 * inside, 5), 8), (1, round(0.5 * inside, 5), 8)]


def test_score_threshold_keeps_instances_scoring_at_least_it():
    rows = [(0, 0.9), (1, 0.6), (0, 0.3)]
    masks = [columns_mask([0, 1]), columns_mask([2, 3]), columns_mask([4, 5])]
    inside = sigmoid(10.0)
    everything = instances(rows, masks, max_per_image=3)
    assert everything == [(0, round(0.9 * inside, 5), 8), (1, round(0.6 * inside, 5), 8), (0, round(0.3 * inside, 5), 8)]
    assert instances(rows, masks, max_per_image=3, score_threshold=0.5) == everything[:2]
    assert instances(rows, masks, max_per_image=3, score_threshold=0.7) == everything[:1]
    assert instances(rows, masks, max_per_image=3, score_threshold=0.95) == []


def test_boxes_follow_mmdet_mask2bbox_and_coco_xywh():
    """x2 / y2 = last column / row + 1 (mmdet's ``mask2bbox``); COCO's bbox = [x, y, width, height] in pixels."""
    from modelscope_plugin.inference.outputs import build_outputs
    from modelscope_plugin.inference.postprocess import Segment, mask_to_box

    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:5] = True  # rows 1-2, columns 2-4
    mask[2, 6] = False
    assert mask_to_box(mask) == [2.0, 1.0, 5.0, 3.0]
    assert mask_to_box(np.zeros((5, 7), bool)) == [0.0] * 4
    single = np.zeros((5, 7), bool)
    single[4, 6] = True
    assert mask_to_box(single) == [6.0, 4.0, 7.0, 5.0]
    segment = Segment(label=0, score=0.5, isthing=True, mask=torch.from_numpy(mask), panoptic_id=1000)
    outputs = build_outputs("panoptic", [segment], ["thing"], [7], (5, 7))
    assert outputs["boxes"] == [[2.0, 1.0, 5.0, 3.0]]
    assert outputs["segments_info"][0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and outputs["segments_info"][0]["area"] == 6
    assert outputs["category_ids"] == [7] and outputs["segments_info"][0]["category_id"] == 7


def test_semantic_map_and_scores_follow_the_class_evidence():
    """Class map = argmax_c sum_q P(c | q) sigmoid(mask_q); a segment's score = the mean over its pixels of the
    winning class's share of the evidence (the documented rule), worked out here in float64."""
    from modelscope_plugin.inference.postprocess import semantic_inference

    rows, masks = [(0, 0.9), (2, 0.6)], [columns_mask([0, 1, 2]), columns_mask([3, 4, 5])]
    class_map, segments = semantic_inference(class_logits_for(rows), torch.stack(masks), **SAME_SIZE)
    probabilities = np.array([[0.9, 0.1 / 3, 0.1 / 3], [0.4 / 3, 0.4 / 3, 0.6]])
    inside, outside = sigmoid(10.0), sigmoid(-10.0)
    left = probabilities[0] * inside + probabilities[1] * outside  # evidence on columns 0-2
    right = probabilities[0] * outside + probabilities[1] * inside
    assert class_map.tolist() == [[0, 0, 0, 2, 2, 2]] * 4
    assert [segment.label for segment in segments] == [2, 0]  # descending class id
    assert segments[0].score == pytest.approx(right[2] / right.sum(), abs=1e-6)
    assert segments[1].score == pytest.approx(left[0] / left.sum(), abs=1e-6)
    assert segments[0].mask.sum() == 12 and segments[1].mask[:, :3].all()


def test_weighted_first_argmax_equals_argmax_of_the_product_on_both_paths():
    """The numpy loop (CPU) and the torch loop (other devices, run here on the CPU) give argmax(0) of
    weights * values, ties to the first, in the asked dtype."""
    from modelscope_plugin.inference.postprocess import _first_argmax_torch

    generator = torch.Generator().manual_seed(0)
    values = torch.rand(7, 9, 11, generator=generator).round(decimals=1)  # many ties
    weights = torch.tensor([1.0, 0.5, 1.0, 2.0, 0.5, 1.0, 2.0])
    expected = (weights[:, None, None] * values).argmax(0)
    for dtype in (torch.uint8, torch.int32, torch.long):
        assert torch.equal(first_argmax(values, weights, dtype=dtype).long(), expected)
        assert torch.equal(_first_argmax_torch(values, weights, dtype).long(), expected)
        assert first_argmax(values, weights, dtype=dtype).dtype == dtype
    assert torch.equal(_first_argmax_torch(values, None, torch.long), values.argmax(0))
