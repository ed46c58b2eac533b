"""FastInst without the reference: query selection, the dual-path layer, the location cost, loading, ONNX.

Hand-built tensors with expected values written out, float64 re-implementations of the attention maths, and
checkpoints written in the hub / official-release layouts from this package's own network.
"""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_layouts_offline import to_detectron2_names

from modelscope_plugin.builders import build_fastinst
from modelscope_plugin.config import FastInstConfig, ResNetConfig
from modelscope_plugin.errors import CheckpointError, ModelDirError
from modelscope_plugin.model_dirs import fastinst as model_dir_fastinst
from modelscope_plugin.model_dirs.load import load_model, load_model_dir
from modelscope_plugin.modeling.fastinst.location_cost import (
    ground_truth_attention_mask,
    proposal_location_cost,
    query_location_cost,
)
from modelscope_plugin.modeling.fastinst.pixel_decoder import adaptive_average_pool
from modelscope_plugin.modeling.fastinst.transformer_decoder import (
    FastInstDecoder,
    QueryProposal,
    instance_activation_scores,
    seek_local_maximum,
)


def tiny_config(**overrides) -> FastInstConfig:
    """Hub-readable (GroupNorm with 32 groups, as ModelScope always builds it) but narrow."""
    return replace(FastInstConfig(num_classes=5, num_queries=12, num_aux_queries=3, hidden_dim=32, mask_dim=24,
                                  num_heads=4, feedforward_dim=48, decoder_layers=2, num_groups=32), **overrides)


# ----------------------------------------------------------------------------------------------------------------------
# query selection


def test_local_maximum_compares_all_eight_neighbours_with_zero_padding():
    values = torch.tensor([[0.9, 0.2, 0.0, 0.0],
                           [0.1, 0.3, 0.0, 0.5],
                           [0.0, 0.0, 0.0, 0.5],
                           [0.0, 0.4, 0.0, 0.0]])[None, None]
    expected = torch.tensor([[1, 0, 0, 0],
                             [0, 0, 0, 1],   # 0.3 < 0.9 diagonally; the two 0.5 tie, both count
                             [0, 0, 0, 1],
                             [0, 1, 0, 0]], dtype=torch.float32)[None, None]
    assert torch.equal(seek_local_maximum(values), expected)
    # values below epsilon are never maxima (zeros of other classes' maps are not candidates)
    assert seek_local_maximum(values * 1e-7).sum() == 0


def test_activation_scores_keep_the_best_class_and_lift_local_maxima():
    # 2 foreground classes + no-object on a 1x3 map, given as log-probabilities so softmax returns them
    probabilities = torch.tensor([
        [[0.6, 0.2, 0.1]],   # class 0
        [[0.3, 0.5, 0.2]],   # class 1
        [[0.1, 0.3, 0.7]],   # no object
    ])[None]
    scores = instance_activation_scores(probabilities.log())
    # pixel 0: class 0 (0.6), a maximum of class 0's map [0.6, 0, 0]; pixel 1: class 1 (0.5), a maximum of
    # [0, 0.5, 0.2]; pixel 2: class 1 (0.2), not a maximum (0.5 beside it). No-object never counts.
    assert torch.allclose(scores, torch.tensor([[1.6, 1.5, 0.2]]), atol=1e-6)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, features):
        return self.logits


def test_query_proposal_takes_local_maxima_first_then_top_k_and_gathers_their_features():
    proposal = QueryProposal(num_features=2, num_queries=3, num_classes=2)
    height, width = 3, 4
    features = torch.arange(2 * height * width, dtype=torch.float32).reshape(1, 2, height, width)
    positions = -torch.arange(2 * height * width, dtype=torch.float32).reshape(1, 2, height, width)
    probabilities = torch.full((1, 3, height, width), 0.1)
    probabilities[0, 0] = torch.tensor([[0.50, 0.55, 0.10, 0.10], [0.10, 0.10, 0.10, 0.10], [0.10, 0.10, 0.10, 0.30]])
    probabilities[0, 1] = torch.tensor([[0.20, 0.20, 0.20, 0.20], [0.20, 0.45, 0.20, 0.20], [0.20, 0.20, 0.20, 0.20]])
    probabilities[0, 2] = 1 - probabilities[0, 0] - probabilities[0, 1]
    proposal.conv_proposal_cls_logits = FixedLogits(probabilities.log())  # the head's output, fixed
    query_features, query_positions, indices, _ = proposal(features, positions)
    # local maxima of the one-hot class maps: class 0 at (0, 1) 0.55 and (2, 3) 0.30; class 1 at (1, 1) 0.45 and at
    # (0, 3), (1, 3) 0.20 (no larger neighbour) -> scores 1.55, 1.45, 1.30, 1.20, 1.20; (0, 0) is only 0.50
    assert indices.tolist() == [[1, 5, 11]]
    assert torch.equal(query_features, features.flatten(2)[:, :, [1, 5, 11]])
    assert torch.equal(query_positions, positions.flatten(2)[:, :, [1, 5, 11]])


def test_query_proposal_refuses_maps_smaller_than_the_query_count():
    proposal = QueryProposal(num_features=4, num_queries=10, num_classes=2)
    with pytest.raises(ValueError, match="too small"):
        proposal(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3))


# ----------------------------------------------------------------------------------------------------------------------
# the dual-path layer


def attention64(queries, keys, values, layer, blocked=None):
    """float64 multi-head attention with nn.MultiheadAttention's weights; blocked (Lq, Lk) True = masked (every head)."""
    attention = layer.multihead_attn if hasattr(layer, "multihead_attn") else layer.self_attn
    heads, dim = attention.num_heads, attention.embed_dim
    weight, bias = attention.in_proj_weight.double(), attention.in_proj_bias.double()
    q = queries @ weight[:dim].T + bias[:dim]
    k = keys @ weight[dim:2 * dim].T + bias[dim:2 * dim]
    v = values @ weight[2 * dim:].T + bias[2 * dim:]
    head_dim = dim // heads
    outputs = []
    for head in range(heads):
        part = slice(head * head_dim, (head + 1) * head_dim)
        logits = q[:, part] @ k[:, part].T / math.sqrt(head_dim)
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        outputs.append(torch.softmax(logits, -1) @ v[:, part])
    return torch.cat(outputs, -1) @ attention.out_proj.weight.double().T + attention.out_proj.bias.double()


def layer_norm64(values, norm):
    return F.layer_norm(values, (values.shape[-1],), norm.weight.double(), norm.bias.double(), norm.eps)


def feed_forward64(values, layer):
    hidden = torch.relu(values @ layer.linear1.weight.double().T + layer.linear1.bias.double())
    return layer_norm64(values + hidden @ layer.linear2.weight.double().T + layer.linear2.bias.double(), layer.norm)


def test_dual_path_layer_equals_its_definition_in_float64():
    torch.manual_seed(0)
    decoder = FastInstDecoder(in_channels=16, num_classes=3, hidden_dim=16, num_queries=4, num_aux_queries=2,
                              num_heads=2, feedforward_dim=24, num_layers=1, mask_dim=16).eval()
    queries, pixels = torch.randn(6, 1, 16), torch.randn(10, 1, 16)
    query_positions, pixel_positions = torch.randn(6, 1, 16), torch.randn(10, 1, 16)
    blocked = torch.rand(1, 6, 10) < 0.4
    blocked[:, :, 0] = False  # every query sees at least one pixel
    new_queries, new_pixels = decoder.dual_path_layer(0, queries, pixels, query_positions, pixel_positions, blocked)

    q, p = queries[:, 0].double(), pixels[:, 0].double()
    qp, pp = query_positions[:, 0].double(), pixel_positions[:, 0].double()
    # pixel path: pixels attend to all queries, then a feed-forward block (post-norm)
    mask_attention = decoder.transformer_mask_cross_attention_layers[0]
    p = layer_norm64(p + attention64(p + pp, q + qp, q, mask_attention), mask_attention.norm)
    p = feed_forward64(p, decoder.transformer_mask_ffn_layers[0])
    # query path: masked attention to the UPDATED pixels, self-attention, feed-forward
    cross = decoder.transformer_query_cross_attention_layers[0]
    q = layer_norm64(q + attention64(q + qp, p + pp, p, cross, blocked[0]), cross.norm)
    self_attention = decoder.transformer_query_self_attention_layers[0]
    q = layer_norm64(q + attention64(q + qp, q + qp, q, self_attention), self_attention.norm)
    q = feed_forward64(q, decoder.transformer_query_ffn_layers[0])
    assert (new_pixels[:, 0].double() - p).abs().max() < 1e-5
    assert (new_queries[:, 0].double() - q).abs().max() < 1e-5


def test_queries_ignore_the_pixels_their_mask_blocks():
    torch.manual_seed(1)
    decoder = FastInstDecoder(in_channels=16, num_classes=3, hidden_dim=16, num_queries=3, num_aux_queries=1,
                              num_heads=2, feedforward_dim=24, num_layers=1, mask_dim=16).eval()
    queries, pixels = torch.randn(4, 1, 16), torch.randn(8, 1, 16)
    positions = (torch.randn(4, 1, 16), torch.randn(8, 1, 16))
    blocked = torch.zeros(1, 4, 8, dtype=torch.bool)
    blocked[:, :, 5] = True  # nobody attends to pixel 5
    changed = pixels.clone()
    changed[5] += 3.0
    with torch.no_grad():
        first_queries, first_pixels = decoder.dual_path_layer(0, queries, pixels, *positions, blocked)
        second_queries, second_pixels = decoder.dual_path_layer(0, queries, changed, *positions, blocked)
        unmasked_queries, _ = decoder.dual_path_layer(0, queries, changed, *positions, None)
    assert torch.allclose(first_queries, second_queries, atol=1e-6)
    assert not torch.allclose(first_pixels[5], second_pixels[5])  # the pixel path still updates pixel 5
    assert not torch.allclose(first_queries, unmasked_queries, atol=1e-3)


def test_attention_mask_lets_auxiliary_and_empty_queries_attend_everywhere():
    decoder = FastInstDecoder(in_channels=8, num_classes=2, hidden_dim=8, num_queries=2, num_aux_queries=1, num_heads=2,
                              feedforward_dim=8, num_layers=1, mask_dim=8)
    mask_logits = torch.tensor([[[[1.0, -1.0], [-0.5, 0.0]], [[-1.0, -2.0], [-3.0, -0.1]]]])  # (1, 2, 2, 2)
    blocked = decoder.attention_mask(mask_logits)
    assert blocked.shape == (1, 3, 4)  # one mask per image, shared by the heads
    expected = torch.tensor([[False, True, True, False],   # logit >= 0 is attended
                             [False, False, False, False],  # an all-negative mask blocks nothing
                             [False, False, False, False]])  # the auxiliary query
    assert torch.equal(blocked[0], expected)


# ----------------------------------------------------------------------------------------------------------------------
# the location cost (training-time matching)


def test_query_location_cost_is_minus_one_inside_the_instance():
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4] = 1  # top-left quadrant
    masks[1, 4:, :] = 1   # bottom half
    locations = torch.tensor([[0.1, 0.1], [0.9, 0.9], [0.2, 0.8], [0.9, 0.1]])  # (x, y)
    cost = query_location_cost(locations, masks)
    expected = torch.tensor([[-1.0, 0.0], [0.0, -1.0], [0.0, -1.0], [0.0, 0.0]])
    assert torch.equal(cost, expected)


def test_proposal_location_cost_marks_every_cell_the_instance_touches():
    masks = torch.zeros(1, 8, 8)
    masks[0, 1, 5] = 1  # one pixel, in the top-right cell of a 2x2 proposal map
    cost = proposal_location_cost((2, 2), masks)
    assert torch.equal(cost, torch.tensor([[0.0], [-1.0], [0.0], [0.0]]))
    assert proposal_location_cost((2, 2), torch.zeros(0, 8, 8)).shape == (4, 0)


def test_ground_truth_attention_mask_confines_matched_queries_to_their_instance():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 2:, 2:] = True
    blocked = ground_truth_attention_mask([masks], [(torch.tensor([2]), torch.tensor([1]))], num_queries=3,
                                          num_aux_queries=1, pixel_size=(2, 2))
    assert blocked.shape == (1, 4, 4)
    # query 2 matched to instance 1 (bottom-right cell of the 2x2 map); the others attend everywhere
    assert blocked[0].tolist() == [[False] * 4, [False] * 4, [True, True, True, False], [False] * 4]


# ----------------------------------------------------------------------------------------------------------------------
# network, training outputs, export helpers


def test_network_shapes_strides_and_training_outputs():
    torch.manual_seed(0)
    config = tiny_config()
    network = build_fastinst(config).eval()
    images = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        output = network(images)
    assert output.class_logits.shape == (2, 12, 6)
    assert output.mask_logits.shape == (2, 12, 20, 28)  # stride 8
    assert output.proposal_class_logits.shape == (2, 6, 10, 14)  # stride 16
    assert output.auxiliary_class_logits == [] and len(output.auxiliary_mask_logits) == 2
    assert output.query_locations is None
    # a batch answers as its images alone (GroupNorm, frozen batch norm: no cross-image statistics)
    with torch.no_grad():
        single = network(images[1:])
    assert (single.class_logits[0] - output.class_logits[1]).abs().max() < 1e-4

    network.train()
    output = network(images)
    assert len(output.auxiliary_class_logits) == 2  # every stage is supervised in training
    height, width = 10, 14
    rows, columns = output.query_indices // width, output.query_indices % width
    assert torch.allclose(output.query_locations, torch.stack([columns / (width - 1), rows / (height - 1)], -1), atol=1e-6)
    blocked = torch.zeros(2, 15, 20 * 28, dtype=torch.bool)
    guided_class, guided_mask = network.transformer_decoder.guided_forward(output.decoder_state, blocked)
    assert [tensor.shape for tensor in guided_class] == [(2, 12, 6)] * 2
    assert [tensor.shape for tensor in guided_mask] == [(2, 12, 20, 28)] * 2
    (output.class_logits.sum() + sum(tensor.sum() for tensor in guided_mask)).backward()


@pytest.mark.parametrize("size", [(20, 30), (17, 23), (6, 6), (1, 4)])
def test_exportable_adaptive_pooling_equals_torch(size):
    features = torch.randn(2, 3, *size)
    for bins in (1, 2, 3, 6):
        assert (adaptive_average_pool(features, bins) - F.adaptive_avg_pool2d(features, bins)).abs().max() < 1e-5


def test_onnx_export_reproduces_logits_at_two_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    from modelscope_plugin.apps.export import check_onnx, export_onnx

    torch.manual_seed(0)
    network = build_fastinst(tiny_config()).eval()
    path = export_onnx(network, tmp_path / "fastinst.onnx", example_size=(128, 160))
    largest = check_onnx(network, path, sizes=((128, 160), (192, 96)), tolerance=1e-4)
    assert largest < 1e-4
    with pytest.raises(FileExistsError):
        export_onnx(network, path)


# ----------------------------------------------------------------------------------------------------------------------
# loading: hub layout, official releases, strictness


def hub_configuration(config: FastInstConfig) -> dict:
    return model_dir_fastinst.hub_configuration(replace(config, class_names=tuple(f"thing_{index}" for index in range(config.num_classes))))


def write_hub_dir(directory, config, state_dict):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configuration.json").write_text(json.dumps(hub_configuration(config)))
    torch.save({"model": state_dict}, directory / "pytorch_model.pt")
    return directory


@pytest.mark.parametrize("backbone", [ResNetConfig(depth=50), ResNetConfig(depth=18, width=16)])
def test_hub_layout_loads_strictly_into_the_same_network(tmp_path, backbone):
    config = tiny_config(backbone=backbone)
    torch.manual_seed(0)
    source = build_fastinst(config).eval()
    write_hub_dir(tmp_path / "hub", config, to_detectron2_names(source.state_dict()))
    loaded_config, loaded = load_model_dir(tmp_path / "hub")
    assert loaded_config.class_names[0] == "thing_0" and loaded_config.decoder_layers == 2
    assert loaded_config.backbone == backbone
    assert loaded_config.preprocess.short_side == 640 and loaded_config.preprocess.resize_backend == "pil"
    assert loaded_config.inference.mask_from_probability and loaded_config.task == "instance"
    images = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        assert torch.equal(loaded(images).mask_logits, source(images).mask_logits)


def test_strict_loading_names_missing_unexpected_and_mis_shaped_keys(tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    weights = to_detectron2_names(build_fastinst(config).state_dict())
    del weights["sem_seg_head.predictor.query_proposal.conv_proposal_cls_logits.0.bias"]
    weights["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    weights["sem_seg_head.predictor.meta_pos_embed"] = torch.zeros(1, 32, 4, 4)
    write_hub_dir(tmp_path / "bad", config, weights)
    with pytest.raises(CheckpointError) as error:
        load_model_dir(tmp_path / "bad")
    message = str(error.value)
    assert "missing (1)" in message and "transformer_decoder.query_proposal.conv_proposal_cls_logits.0.bias" in message
    assert "unexpected (1)" in message and "transformer_decoder.extra_head.weight" in message
    assert "transformer_decoder.meta_pos_embed: checkpoint (1, 32, 4, 4) vs model (1, 32, 3, 3)" in message


def test_hub_configuration_errors_name_the_field(tmp_path):
    config = tiny_config()
    directory = write_hub_dir(tmp_path / "dir", config, {})
    configuration = hub_configuration(config)
    configuration["model"]["decoder"]["pre_norm"] = True
    (directory / "configuration.json").write_text(json.dumps(configuration))
    with pytest.raises(ModelDirError, match="decoder.pre_norm = True is not supported"):
        load_model_dir(directory)
    configuration = hub_configuration(config)
    configuration["model"]["backbone"]["res2_out_channels"] = 64
    (directory / "configuration.json").write_text(json.dumps(configuration))
    with pytest.raises(ModelDirError, match="backbone.res2_out_channels = 64 does not fit a ResNet-50 of stem width 64 "
                                            "\\(expected 256\\)"):
        load_model_dir(directory)
    configuration = hub_configuration(config)
    configuration["model"]["backbone"]["depth"] = 26
    (directory / "configuration.json").write_text(json.dumps(configuration))
    with pytest.raises(ModelDirError, match="backbone.depth = 26 is not supported"):
        load_model_dir(directory)
    configuration = hub_configuration(config)
    configuration["model"]["classes"] = ["only_one"]
    (directory / "configuration.json").write_text(json.dumps(configuration))
    with pytest.raises(ModelDirError, match="1 classes for decoder.num_classes = 5"):
        load_model_dir(directory)
    (directory / "pytorch_model.pt").write_bytes(b"")
    (directory / "configuration.json").write_text(json.dumps(hub_configuration(config)))
    with pytest.raises(CheckpointError, match="is empty"):
        load_model_dir(directory)


def test_official_release_file_loads_with_its_architecture_read_from_the_weights(tmp_path):
    """A detectron2 .pth as the FastInst repository releases it: FrozenBN (no counters), its SetCriterion's buffer
    (assigned to the predictor), class-weight buffers at the top level; D1 -> the 576 / 777 test size."""
    config = replace(FastInstConfig(), decoder_layers=1, hidden_dim=64, mask_dim=64, feedforward_dim=128, num_heads=8)
    torch.manual_seed(0)
    source = build_fastinst(config).eval()
    weights = to_detectron2_names(source.state_dict())
    weights["criterion.empty_weight"] = torch.ones(81)
    weights["sem_seg_head.predictor.criterion.empty_weight"] = torch.ones(81)
    torch.save({"model": weights, "iteration": 368749}, tmp_path / "fastinst_R50_ppm-fpn_x1_576.pth")
    loaded_config, loaded = load_model(tmp_path / "fastinst_R50_ppm-fpn_x1_576.pth")
    assert (loaded_config.decoder_layers, loaded_config.num_queries, loaded_config.num_aux_queries) == (1, 100, 8)
    assert (loaded_config.hidden_dim, loaded_config.feedforward_dim, loaded_config.backbone.depth) == (64, 128, 50)
    assert (loaded_config.preprocess.short_side, loaded_config.preprocess.long_side_max) == (576, 777)
    assert loaded_config.class_names[0] == "person" and loaded_config.category_ids[-1] == 90
    images = torch.randn(1, 3, 192, 224)
    with torch.no_grad():
        assert torch.equal(loaded(images).class_logits, source(images).class_logits)


def test_pipeline_on_a_hub_directory_returns_the_output_contract(tmp_path):
    from conftest import SHARED_DATA
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    config = tiny_config()
    torch.manual_seed(0)
    network = build_fastinst(config).eval()
    with torch.no_grad():  # spread classes so scores pass the threshold sometimes
        network.transformer_decoder.class_embed_layers[-1].layers[-1].weight.mul_(30)
    directory = write_hub_dir(tmp_path / "hub", config, to_detectron2_names(network.state_dict()))
    segmenter = pipeline(Tasks.image_segmentation, model=str(directory), device="cpu")
    image = SHARED_DATA / "photos" / "astronaut.png"
    everything = segmenter(str(image), score_thr=0)
    assert len(everything["masks"]) == config.num_queries * config.num_classes  # 60 (query, class) pairs < top-100
    assert everything["scores"] == sorted(everything["scores"], reverse=True)
    assert set(everything) >= {"masks", "labels", "scores", "label_ids", "category_ids", "boxes"}
    assert everything["masks"][0].dtype == np.uint8 and everything["masks"][0].shape == (512, 512)
    default = segmenter(str(image))
    assert default["scores"] == [score for score in everything["scores"] if score >= 0.5]
    # numpy input is BGR (ModelScope's convention), and a batched list answers as single images do (batched
    # convolutions round differently, and this unshaped network has many mask logits near 0: a few pixels flip)
    from PIL import Image

    bgr = np.asarray(Image.open(image).convert("RGB"))[:, :, ::-1].copy()
    batched = segmenter([bgr, str(image)], batch_size=2, score_thr=0)
    for result in batched:
        assert result["labels"] == everything["labels"]
        assert np.allclose(result["scores"], everything["scores"], atol=1e-4)
        for ours, single in zip(result["masks"], everything["masks"]):
            assert (ours != single).sum() <= 1e-3 * max(1, (ours | single).sum())  # IoU >= 0.999
