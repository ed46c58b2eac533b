"""FastInst's training loss on hand-built tensors: location cost in the matching, the proposal (instance-activation)
loss, ground-truth mask-guided supervision, deep supervision and the official weights; every term against a float64
re-derivation written here (brute-force matching, explicit formulas), and on the real tiny network."""
import itertools
import math
from dataclasses import replace

import pytest
import torch

from modelscope_plugin.builders import build_fastinst
from modelscope_plugin.config import FastInstConfig
from modelscope_plugin.modeling.fastinst.criterion import FastInstCriterion
from modelscope_plugin.modeling.fastinst.model import FastInstOutput
from modelscope_plugin.modeling.fastinst.transformer_decoder import DecoderState
from modelscope_plugin.modeling.matcher import SegmentationTarget
from modelscope_plugin.modeling.point_sampling import PointSampler

LOW, SCALE = 8, 4  # predicted masks 8 x 8 (stride 8), targets 32 x 32 (the padded input), proposal map 4 x 4
NUM_CLASSES, NUM_QUERIES, NUM_AUX = 3, 3, 2


class PixelCentreSampler(PointSampler):
    """Every draw is the 8 x 8 grid of pixel centres (tiled to the asked count): with importance_sample_ratio = 0 the
    point-sampled losses are exact per-pixel means, which the reference below computes directly."""

    def __init__(self, batch_size):
        super().__init__([torch.Generator() for _ in range(batch_size)])

    def uniform(self, image_index, count, num_points, device=None):
        y, x = torch.meshgrid((torch.arange(LOW) + 0.5) / LOW, (torch.arange(LOW) + 0.5) / LOW, indexing="ij")
        grid = torch.stack([x, y], -1).reshape(-1, 2)
        tiled = grid.repeat(math.ceil(num_points / grid.shape[0]), 1)[:num_points]
        return tiled[None].expand(count, -1, -1).clone()


class RecordingDecoder:
    """Stands in for FastInstDecoder.guided_forward: returns fixed guided predictions and records the guide."""

    num_aux_queries = NUM_AUX

    def __init__(self, class_logits, mask_logits):
        self.outputs = ([class_logits], [mask_logits])
        self.guide = None

    def guided_forward(self, state, guide):
        self.guide = guide
        return self.outputs


def criterion(**overrides):
    values = dict(num_points=LOW * LOW, importance_sample_ratio=0.0)
    values.update(overrides)
    return FastInstCriterion(NUM_CLASSES, **values)


def make_case(seed=0):
    generator = torch.Generator().manual_seed(seed)
    low_masks = [torch.zeros(2, LOW, LOW), torch.zeros(1, LOW, LOW)]
    low_masks[0][0, 1:4, 1:5] = 1
    low_masks[0][1, 4:7, 3:8] = 1
    low_masks[1][0, 2:6, 0:3] = 1
    labels = [torch.tensor([2, 0]), torch.tensor([1])]
    targets = [SegmentationTarget(label, mask.repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2))
               for label, mask in zip(labels, low_masks)]

    def logits(*shape):
        return torch.randn(*shape, generator=generator) * 2

    # query locations at pixel centres of the 8 x 8 grid; (row, column) per query
    cells = torch.tensor([[[2, 2], [5, 5], [0, 7]], [[3, 1], [7, 7], [4, 2]]])
    locations = torch.stack([(cells[..., 1] + 0.5) / LOW, (cells[..., 0] + 0.5) / LOW], -1)
    output = FastInstOutput(
        class_logits=logits(2, NUM_QUERIES, NUM_CLASSES + 1), mask_logits=logits(2, NUM_QUERIES, LOW, LOW),
        proposal_class_logits=logits(2, NUM_CLASSES + 1, 4, 4), query_indices=torch.zeros(2, NUM_QUERIES, dtype=torch.int64),
        auxiliary_class_logits=[logits(2, NUM_QUERIES, NUM_CLASSES + 1)],
        auxiliary_mask_logits=[logits(2, NUM_QUERIES, LOW, LOW)], query_locations=locations,
        decoder_state=DecoderState([], [], None, None, (LOW, LOW)))
    decoder = RecordingDecoder(logits(2, NUM_QUERIES, NUM_CLASSES + 1), logits(2, NUM_QUERIES, LOW, LOW))
    return output, targets, low_masks, cells, decoder


# ---------------------------------------------------------------------------------------------------------- reference

def bce64(logits, target):
    return (torch.clamp(logits, min=0) - logits * target + torch.log1p(torch.exp(-logits.abs()))).mean()


def dice64(logits, target):
    probabilities = torch.sigmoid(logits)
    return 1 - (2 * (probabilities * target).sum() + 1) / (probabilities.sum() + target.sum() + 1)


def brute_force_match(cost):
    """(rows, T) cost -> (row indices, target indices) of the cheapest injective assignment, targets in order."""
    rows, num_targets = cost.shape
    best = min(itertools.permutations(range(rows), num_targets),
               key=lambda rows_chosen: sum(cost[row, target].item() for target, row in enumerate(rows_chosen)))
    order = sorted(range(num_targets), key=lambda target: best[target])
    return [best[target] for target in order], order


def reference_query_match(class_logits, mask_logits, labels, low_masks, cells, location_weight=1000.0):
    class_logits, mask_logits = class_logits.double(), mask_logits.double()
    cost = torch.zeros(class_logits.shape[0], len(labels), dtype=torch.float64)
    for query in range(class_logits.shape[0]):
        probabilities = torch.softmax(class_logits[query], -1)
        for target, (label, mask) in enumerate(zip(labels, low_masks.double())):
            inside = float(mask[cells[query, 0], cells[query, 1]] > 0)
            cost[query, target] = (2 * -probabilities[label] + 5 * bce64(mask_logits[query], mask)
                                   + 5 * dice64(mask_logits[query], mask) - location_weight * inside)
    return brute_force_match(cost)


def reference_losses(output, decoder, low_masks, cells, labels):
    """Every term of the FastInst loss, recomputed in float64 from the definitions."""
    num_masks = float(sum(len(label) for label in labels))

    def stage(class_logits, mask_logits, matches):
        weighted, weights, mask_total, dice_total = 0.0, 0.0, 0.0, 0.0
        for image, (queries, targets) in enumerate(matches):
            classes = torch.full((NUM_QUERIES,), NUM_CLASSES)
            classes[queries] = labels[image][targets]
            log_probabilities = torch.log_softmax(class_logits[image].double(), -1)
            for query in range(NUM_QUERIES):
                weight = 0.1 if classes[query] == NUM_CLASSES else 1.0
                weighted += -weight * log_probabilities[query, classes[query]].item()
                weights += weight
            for query, target in zip(queries, targets):
                mask = low_masks[image][target].double()
                mask_total += bce64(mask_logits[image, query].double(), mask).item()
                dice_total += dice64(mask_logits[image, query].double(), mask).item()
        return {"loss_ce": weighted / weights, "loss_mask": mask_total / num_masks, "loss_dice": dice_total / num_masks}

    def match(class_logits, mask_logits):
        return [reference_query_match(class_logits[image], mask_logits[image], labels[image], low_masks[image], cells[image])
                for image in range(2)]

    final_matches = match(output.class_logits, output.mask_logits)
    expected = dict(stage(output.class_logits, output.mask_logits, final_matches))
    guided_class, guided_mask = decoder.outputs[0][0], decoder.outputs[1][0]
    expected.update({f"{name}_0": value for name, value in stage(guided_class, guided_mask, final_matches).items()})
    auxiliary_class, auxiliary_mask = output.auxiliary_class_logits[0], output.auxiliary_mask_logits[0]
    expected.update({f"{name}_1": value for name, value in
                     stage(auxiliary_class, auxiliary_mask, match(auxiliary_class, auxiliary_mask)).items()})

    proposal_total = 0.0
    for image in range(2):
        # (C + 1, 4, 4) -> (16, C + 1)
        log_probabilities = torch.log_softmax(output.proposal_class_logits[image].double().reshape(NUM_CLASSES + 1, 16).T, -1)
        # a proposal pixel covers an instance where any of its 2 x 2 cells of the 8 x 8 grid is inside it
        covers = low_masks[image].reshape(-1, 4, 2, 4, 2).amax((2, 4)).reshape(-1, 16).T > 0
        cost = 2 * -log_probabilities.exp()[:, labels[image]] - 1000.0 * covers.double()
        pixels, targets = brute_force_match(cost)
        classes = torch.full((16,), NUM_CLASSES)
        classes[pixels] = labels[image][targets]
        proposal_total += -log_probabilities[torch.arange(16), classes].sum().item()
    expected["loss_proposal"] = proposal_total / 32

    guide = torch.zeros(2, NUM_QUERIES + NUM_AUX, LOW * LOW, dtype=torch.bool)
    for image, (queries, targets) in enumerate(final_matches):
        for query, target in zip(queries, targets):
            blocked = low_masks[image][target].flatten() == 0
            guide[image, query] = blocked if not blocked.all() else torch.zeros_like(blocked)
    return expected, guide, final_matches


# -------------------------------------------------------------------------------------------------------------- tests

def test_every_term_equals_a_float64_re_derivation():
    output, targets, low_masks, cells, decoder = make_case()
    labels = [target.labels for target in targets]
    losses = criterion()(output, targets, PixelCentreSampler(2), decoder)
    expected, expected_guide, _ = reference_losses(output, decoder, low_masks, cells, labels)
    assert set(losses) == set(expected)  # last stage, guided pass _0, stage before the layer _1, proposals
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert torch.equal(decoder.guide, expected_guide)
    # official weights: 2 / 5 / 5 for every stage, 20 for the proposals; location only in the matching
    total = sum({"ce": 2, "mask": 5, "dice": 5}[name.split("_")[1]] * value if name != "loss_proposal" else 20 * value
                for name, value in expected.items())
    assert criterion().total(losses).item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matching_equals_brute_force_with_the_location_cost(seed):
    output, targets, low_masks, cells, decoder = make_case(seed)
    loss = criterion()
    costs = loss.location_costs(output.query_locations, targets)
    indices = loss.matcher(output.class_logits, output.mask_logits, targets, PixelCentreSampler(2), additional_costs=costs)
    for image in range(2):
        expected = reference_query_match(output.class_logits[image], output.mask_logits[image], targets[image].labels,
                                         low_masks[image], cells[image])
        assert (indices[image][0].tolist(), indices[image][1].tolist()) == expected


def test_location_cost_overrides_a_better_mask_match():
    """Query 0 predicts instance 0's mask and class perfectly but sits inside instance 1; query 1 the reverse.
    Without the location cost they match their masks; with it (1000, official) each matches the instance it is in."""
    low = torch.zeros(2, LOW, LOW)
    low[0, :4] = 1
    low[1, 4:] = 1
    target = SegmentationTarget(torch.tensor([0, 1]), low.repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2))
    class_logits = torch.full((1, 2, NUM_CLASSES + 1), -5.0)
    class_logits[0, 0, 0] = class_logits[0, 1, 1] = 5.0
    mask_logits = (low * 20 - 10)[None]
    # query 0 at row 6 (instance 1), query 1 at row 1 (instance 0)
    locations = torch.tensor([[[0.5, 6.5 / LOW], [0.5, 1.5 / LOW]]])
    matcher_inputs = (class_logits, mask_logits, [target], PixelCentreSampler(1))
    loss = criterion()
    inside = loss.location_costs(locations, [target])[0]
    assert inside.tolist() == [[0.0, -1000.0], [-1000.0, 0.0]]
    assert [index.tolist() for index in loss.matcher(*matcher_inputs)[0]] == [[0, 1], [0, 1]]
    located = loss.matcher(*matcher_inputs, additional_costs=[inside])[0]
    assert [index.tolist() for index in located] == [[0, 1], [1, 0]]


def test_proposal_loss_of_a_perfect_activation_map_is_zero_and_of_a_flat_one_log_classes():
    low = torch.zeros(1, LOW, LOW)
    low[0, 0:2, 4:6] = 1  # exactly proposal pixel (0, 2)
    target = SegmentationTarget(torch.tensor([1]), low.repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2))
    perfect = torch.full((1, NUM_CLASSES + 1, 4, 4), -30.0)
    perfect[0, NUM_CLASSES] = 30.0  # every pixel "no object" ...
    perfect[0, :, 0, 2] = -30.0
    perfect[0, 1, 0, 2] = 30.0  # ... except the one inside the instance, which is confident of its class
    loss = criterion()
    indices = loss.match_proposals(perfect, [target])
    assert [index.tolist() for index in indices[0]] == [[2], [0]]  # flat pixel 2 = (row 0, column 2)
    assert loss.proposal_loss(perfect, [target], indices).item() < 1e-12
    # a flat map: every pixel's cross-entropy is log(C + 1); the match still lands inside the instance
    flat = torch.zeros(1, NUM_CLASSES + 1, 4, 4)
    indices = loss.match_proposals(flat, [target])
    assert indices[0][0].tolist() == [2]
    assert loss.proposal_loss(flat, [target], indices).item() == pytest.approx(math.log(NUM_CLASSES + 1), rel=1e-6)
    # an instance covering several proposal pixels: the match is the pixel most confident of its class
    wide = torch.zeros(1, LOW, LOW)
    wide[0, 0:4, 0:4] = 1
    wide_target = SegmentationTarget(torch.tensor([2]), wide.repeat_interleave(SCALE, 1).repeat_interleave(SCALE, 2))
    scores = torch.zeros(1, NUM_CLASSES + 1, 4, 4)
    scores[0, 2, 1, 1], scores[0, 2, 3, 3] = 2.0, 6.0  # (3, 3) is more confident but outside the instance
    assert loss.match_proposals(scores, [wide_target])[0][0].tolist() == [5]


def test_the_loss_falls_as_the_prediction_approaches_the_target():
    output, targets, low_masks, cells, decoder = make_case()
    loss = criterion()
    before = loss(output, targets, PixelCentreSampler(2), decoder)
    indices = loss.matcher(output.class_logits, output.mask_logits, targets, PixelCentreSampler(2),
                           additional_costs=loss.location_costs(output.query_locations, targets))
    better = replace(output, mask_logits=output.mask_logits.clone(), class_logits=output.class_logits.clone())
    for image, (queries, target_indices) in enumerate(indices):
        for query, target in zip(queries, target_indices):
            better.mask_logits[image, query] = low_masks[image][target] * 8 - 4
            better.class_logits[image, query, targets[image].labels[target]] += 5
    after = loss(better, targets, PixelCentreSampler(2), decoder)
    for name in ("loss_ce", "loss_mask", "loss_dice"):
        assert after[name] < 0.5 * before[name], name
    assert after["loss_proposal"] == before["loss_proposal"]


def test_images_without_instances_and_an_inference_output_are_handled():
    output, targets, _, _, decoder = make_case()
    empty = [SegmentationTarget(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 32, 32))] * 2
    losses = criterion()(output, empty, PixelCentreSampler(2), decoder)
    assert losses["loss_mask"].item() == losses["loss_dice"].item() == 0.0
    assert torch.isfinite(criterion().total(losses))
    assert not decoder.guide.any()  # nothing matched: every query attends everywhere
    with pytest.raises(ValueError, match="training-mode output"):
        criterion()(replace(output, query_locations=None), targets, PixelCentreSampler(2), decoder)


def test_on_the_tiny_network_every_stage_and_the_guided_passes_get_gradients():
    config = FastInstConfig(num_classes=NUM_CLASSES, num_queries=12, num_aux_queries=3, hidden_dim=32, mask_dim=24,
                            num_heads=4, feedforward_dim=48, decoder_layers=2, num_groups=32)
    torch.manual_seed(0)
    network = build_fastinst(config).train()
    images = torch.randn(2, 3, 64, 64)
    _, targets, _, _, _ = make_case()
    targets = [SegmentationTarget(t.labels, torch.nn.functional.interpolate(t.masks[None], size=(64, 64))[0]) for t in targets]
    output = network(images)
    loss = FastInstCriterion(NUM_CLASSES, num_points=64)
    losses = loss(output, targets, PointSampler.from_seeds([0, 1]), network.transformer_decoder)
    # L = 2: the last stage, guided passes _0 _1, earlier stages _2 _3, and the proposals
    assert set(losses) == {f"loss_{kind}{suffix}" for kind in ("ce", "mask", "dice")
                           for suffix in ("", "_0", "_1", "_2", "_3")} | {"loss_proposal"}
    loss.total(losses).backward()
    decoder = network.transformer_decoder
    assert decoder.transformer_query_ffn_layers[1].linear1.weight.grad.abs().sum() > 0
    assert decoder.query_proposal.conv_proposal_cls_logits[2].weight.grad.abs().sum() > 0
    assert all(torch.isfinite(value) for value in losses.values())
