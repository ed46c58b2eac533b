"""Matcher and criterion: equal to transformers' Mask2FormerLoss with the same random points, plus hand-built cases."""
import numpy as np
import pytest
import torch
from conftest import run_oracle

from modelscope_plugin.modeling.criterion import Mask2FormerCriterion
from modelscope_plugin.modeling.mask2former.model import Mask2FormerOutput
from modelscope_plugin.modeling.matcher import HungarianMatcher, SegmentationTarget
from modelscope_plugin.modeling.point_sampling import PointSampler, point_sample, uncertain_point_coordinates

NUM_POINTS = 12544


class RecordingSampler(PointSampler):
    """Logs every draw (image index, tensor) in call order."""

    def __init__(self, seeds):
        super().__init__([torch.Generator().manual_seed(seed) for seed in seeds])
        self.log = []

    def uniform(self, image_index, count, num_points, device=None):
        points = super().uniform(image_index, count, num_points, device)
        self.log.append((image_index, points))
        return points


class RecordingMatcher(HungarianMatcher):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, *arguments, **kwargs):
        indices = super().forward(*arguments, **kwargs)
        self.calls.append(indices)
        return indices


def random_case(seed, batch_size=2, num_queries=7, num_classes=5, num_stages=3, target_counts=(3, 2)):
    generator = torch.Generator().manual_seed(seed)
    stages = [(torch.randn(batch_size, num_queries, num_classes + 1, generator=generator) * 2,
               torch.randn(batch_size, num_queries, 16, 20, generator=generator) * 3) for _ in range(num_stages)]
    targets = []
    for count in target_counts:
        # blobs at the input resolution (4x the mask logits'), several overlapping classes
        masks = (torch.nn.functional.interpolate(torch.randn(count, 1, 8, 10, generator=generator), size=(64, 80),
                                                 mode="bilinear", align_corners=False)[:, 0] > 0.3).float()
        labels = torch.randint(0, num_classes, (count,), generator=generator)
        targets.append(SegmentationTarget(labels=labels, masks=masks))
    output = Mask2FormerOutput(class_logits=stages[0][0], mask_logits=stages[0][1],
                               auxiliary_class_logits=[stage[0] for stage in stages[1:]],
                               auxiliary_mask_logits=[stage[1] for stage in stages[1:]])
    return stages, targets, output


def transformers_draw_order(log, batch_size, num_stages):
    """Our per-image draws rearranged into transformers' call order: per stage, one (1, K, 2) per image for the
    matcher, then the oversampled candidates of all matched masks at once, then their fresh random points."""
    draws, position = [], 0
    for _ in range(num_stages):
        draws += [points for _, points in log[position:position + batch_size]]
        position += batch_size
        per_image = log[position:position + 2 * batch_size]
        position += 2 * batch_size
        draws.append(torch.cat([points for _, points in per_image[0::2]]))
        draws.append(torch.cat([points for _, points in per_image[1::2]]))
    assert position == len(log)
    return draws


@pytest.mark.oracle
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_and_matches_equal_transformers(tmp_path, seed):
    num_classes, num_stages, batch_size = 5, 3, 2
    stages, targets, output = random_case(seed, num_classes=num_classes, num_stages=num_stages)
    matcher = RecordingMatcher(num_points=NUM_POINTS)
    criterion = Mask2FormerCriterion(num_classes, matcher, num_points=NUM_POINTS)
    sampler = RecordingSampler([10 + seed, 20 + seed])
    losses = criterion(output, targets, sampler)
    our_indices = matcher.calls
    draws = transformers_draw_order(sampler.log, batch_size, num_stages)
    arrays = {"num_classes": num_classes, "num_points": NUM_POINTS, "num_stages": num_stages, "batch_size": batch_size,
              "num_draws": len(draws)}
    for stage, (class_logits, mask_logits) in enumerate(stages):
        arrays[f"class_logits_{stage}"] = class_logits.numpy()
        arrays[f"mask_logits_{stage}"] = mask_logits.numpy()
    for image, target in enumerate(targets):
        arrays[f"target_masks_{image}"] = target.masks.numpy()
        arrays[f"target_labels_{image}"] = target.labels.numpy()
    for index, draw in enumerate(draws):
        arrays[f"draw_{index}"] = draw.numpy()
    np.savez(tmp_path / "input.npz", **arrays)
    run_oracle("criterion_oracle.py", tmp_path / "input.npz", tmp_path / "result.npz")
    reference = np.load(tmp_path / "result.npz")

    expected_names = {f"{name}{suffix}" for name in ("loss_ce", "loss_mask", "loss_dice")
                      for suffix in ["", "_0", "_1"]}
    assert set(losses) == expected_names == {name for name in reference.files if name.startswith("loss")}
    for name, value in losses.items():
        assert abs(value.item() - float(reference[name])) < 1e-5, (name, value.item(), float(reference[name]))
    # matcher calls in the same order in both: final stage first, then auxiliary 0, 1
    assert len(our_indices) == num_stages
    for call in range(num_stages):
        for image in range(batch_size):
            queries, matched_targets = our_indices[call][image]
            assert queries.tolist() == reference[f"match_{call}_{image}_queries"].tolist()
            assert matched_targets.tolist() == reference[f"match_{call}_{image}_targets"].tolist()
    # the case is not degenerate: losses differ between stages, all targets matched
    assert len({round(losses[f"loss_mask{suffix}"].item(), 4) for suffix in ["", "_0", "_1"]}) == 3
    assert [len(queries) for queries, _ in our_indices[0]] == [3, 2]


def test_matching_recovers_a_permutation():
    generator = torch.Generator().manual_seed(3)
    num_classes, num_queries = 4, 6
    masks = torch.zeros(3, 32, 32)
    masks[0, 2:12, 2:14] = 1
    masks[1, 16:30, 4:20] = 1
    masks[2, 5:25, 20:30] = 1
    labels = torch.tensor([2, 0, 2])
    owner = [4, 1, 3]  # query answering target t
    class_logits = torch.randn(1, num_queries, num_classes + 1, generator=generator)
    mask_logits = torch.randn(1, num_queries, 32, 32, generator=generator)
    for target, query in enumerate(owner):
        class_logits[0, query, labels[target]] += 6
        mask_logits[0, query] = 8 * (2 * masks[target] - 1)
    matcher = HungarianMatcher(num_points=4096)
    (queries, targets), = matcher(class_logits, mask_logits, [SegmentationTarget(labels, masks)],
                                  PointSampler.from_seeds([0]))
    assert dict(zip(targets.tolist(), queries.tolist())) == {0: 4, 1: 1, 2: 3}


def test_perfect_prediction_has_near_zero_losses_and_a_wrong_one_does_not():
    num_classes = 3
    masks = torch.zeros(2, 64, 64)
    masks[0, 8:40, 8:30] = 1
    masks[1, 30:60, 20:60] = 1
    labels = torch.tensor([1, 2])
    target = SegmentationTarget(labels, masks)
    # predictions at the targets' own resolution: +-20 logits, perfect classes, the other 2 queries "no object"
    mask_logits = torch.full((1, 4, 64, 64), -20.0)
    mask_logits[0, :2] = 20 * (2 * masks - 1)
    class_logits = torch.full((1, 4, num_classes + 1), -10.0)
    class_logits[0, 0, 1] = class_logits[0, 1, 2] = class_logits[0, 2, 3] = class_logits[0, 3, 3] = 10.0
    criterion = Mask2FormerCriterion(num_classes, HungarianMatcher(num_points=NUM_POINTS), num_points=NUM_POINTS)
    perfect = criterion(Mask2FormerOutput(class_logits, mask_logits, [], []), [target], PointSampler.from_seeds([0]))
    # bilinear sampling across the mask border (where 75 % of the points go) leaves a dice residue of a few
    # percent; the class loss is exp(-20)-small
    assert perfect["loss_dice"].item() < 0.08
    assert perfect["loss_ce"].item() < 1e-6
    assert perfect["loss_mask"].item() < 0.2
    wrong = criterion(Mask2FormerOutput(class_logits, mask_logits.flip(-1), [], []), [target], PointSampler.from_seeds([0]))
    assert wrong["loss_dice"].item() > 0.5


def test_loss_sums_do_not_depend_on_the_batch_split():
    """Image b's points come from its own generator, so the per-mask sums (and the weighted cross-entropy sums) of
    a batch are the sums of its images alone (what makes a 2-rank run equal a 1-rank run)."""
    stages, targets, output = random_case(5, num_stages=2)
    criterion = Mask2FormerCriterion(5, HungarianMatcher(num_points=2048), num_points=2048)
    together = criterion(output, targets, PointSampler.from_seeds([7, 8]))
    alone = []
    for image, seed in enumerate([7, 8]):
        single = Mask2FormerOutput(output.class_logits[image:image + 1], output.mask_logits[image:image + 1],
                                   [logits[image:image + 1] for logits in output.auxiliary_class_logits],
                                   [logits[image:image + 1] for logits in output.auxiliary_mask_logits])
        alone.append(criterion(single, [targets[image]], PointSampler.from_seeds([seed])))
    counts = [len(target.labels) for target in targets]
    for name in ("loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0"):
        summed = sum(losses[name].item() * count for losses, count in zip(alone, counts))
        assert abs(together[name].item() * sum(counts) - summed) < 1e-4, name
    # the cross-entropy is a weighted mean: weight 1 per matched query, 0.1 per "no object" one
    num_queries = output.class_logits.shape[1]
    weights = [min(count, num_queries) + 0.1 * (num_queries - min(count, num_queries)) for count in counts]
    for name in ("loss_ce", "loss_ce_0"):
        summed = sum(losses[name].item() * weight for losses, weight in zip(alone, weights))
        assert abs(together[name].item() * sum(weights) - summed) < 1e-4, name


def test_uncertain_points_are_the_candidates_nearest_the_mask_border():
    # logits grow linearly with x (0 at x = 0.5): uncertainty orders the candidates by |x - 0.5|
    columns = (torch.arange(64) + 0.5) / 64
    logits = (40 * (columns - 0.5)).expand(1, 1, 64, 64).contiguous()
    generator = torch.Generator().manual_seed(0)
    drawn = []

    def draw(count, number):  # away from the image edge, where zero padding pulls every logit towards 0
        drawn.append(0.05 + 0.9 * torch.rand(count, number, 2, generator=generator))
        return drawn[-1]

    points = uncertain_point_coordinates(logits, 1000, 3.0, 0.75, draw)
    assert points.shape == (1, 1000, 2)
    candidates, fresh = drawn
    distance = (candidates[0, :, 0] - 0.5).abs()
    threshold = distance.sort().values[749]
    # the 750 importance-sampled points are exactly the 750 candidates nearest the border (a quarter of 3000)
    assert ((points[0, :750, 0] - 0.5).abs() <= threshold + 1e-6).all()
    assert 0.1 < threshold < 0.15
    assert torch.equal(points[0, 750:], fresh[0])


def test_point_sample_reads_pixel_centres():
    features = torch.arange(12.0).reshape(1, 1, 3, 4)
    # pixel (row 1, column 2) has its centre at x = 2.5 / 4, y = 1.5 / 3
    centre = torch.tensor([[[2.5 / 4, 1.5 / 3]]])
    assert point_sample(features, centre).item() == pytest.approx(6.0)


def test_total_applies_the_weights_to_every_stage():
    criterion = Mask2FormerCriterion(3, HungarianMatcher())
    terms = {"loss_ce": torch.tensor(1.0), "loss_mask": torch.tensor(1.0), "loss_dice": torch.tensor(1.0),
             "loss_ce_0": torch.tensor(2.0), "loss_mask_0": torch.tensor(0.0), "loss_dice_0": torch.tensor(0.5)}
    assert criterion.total(terms).item() == pytest.approx(2 + 5 + 5 + 4 + 0 + 2.5)


def test_an_image_without_targets_counts_every_query_as_no_object():
    class_logits = torch.zeros(1, 3, 4)
    mask_logits = torch.zeros(1, 3, 8, 8)
    empty = SegmentationTarget(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 32, 32))
    criterion = Mask2FormerCriterion(3, HungarianMatcher(num_points=64), num_points=64)
    losses = criterion(Mask2FormerOutput(class_logits, mask_logits, [], []), [empty], PointSampler.from_seeds([0]))
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_ce"].item() == pytest.approx(np.log(4))
