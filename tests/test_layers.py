"""Operators against plain float64 loop references."""
import math

import numpy as np
import pytest
import torch

from modelscope_plugin.modeling.backbones.resnet import ResNet
from modelscope_plugin.modeling.backbones.swin import (
    SwinBlock,
    SwinTransformer,
    WindowAttention,
    masked_shifted_windows,
    relative_position_index,
    shifted_window_attention_mask,
    window_partition,
    window_rows,
)
from modelscope_plugin.modeling.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_grid_sample,
)
from modelscope_plugin.modeling.layers.position_encoding import SinePositionEncoding


def bilinear_sample_loop(image: np.ndarray, x: float, y: float) -> np.ndarray:
    """grid_sample(align_corners=False, zeros padding) at normalised (x, y) in [0, 1], one point, float64."""
    channels, height, width = image.shape
    column, row = x * width - 0.5, y * height - 0.5
    column0, row0 = math.floor(column), math.floor(row)
    value = np.zeros(channels)
    for delta_row in (0, 1):
        for delta_column in (0, 1):
            r, c = row0 + delta_row, column0 + delta_column
            weight = (1 - abs(row - r)) * (1 - abs(column - c))
            if 0 <= r < height and 0 <= c < width:
                value += weight * image[:, r, c]
    return value


@pytest.mark.parametrize("function", [multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample])
def test_deformable_attention_equals_loop_reference(function):
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4)]
    batch, queries, heads, head_dim, points = 2, 6, 2, 3, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator, dtype=torch.float64)
    output = function(value, shapes, locations, weights).numpy()

    expected = np.zeros((batch, queries, heads * head_dim))
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                accumulated = np.zeros(head_dim)
                for level, (height, width) in enumerate(shapes):
                    level_value = value[b, starts[level]:starts[level + 1], m].numpy().T.reshape(head_dim, height, width)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        accumulated += weights[b, q, m, level, p].item() * bilinear_sample_loop(level_value, x, y)
                expected[b, q, m * head_dim:(m + 1) * head_dim] = accumulated
    np.testing.assert_allclose(output, expected, rtol=0, atol=1e-12)


def test_deformable_attention_gradients_equal_grid_sample():
    generator = torch.Generator().manual_seed(1)
    shapes = [(6, 5), (3, 3), (2, 1)]
    batch, queries, heads, head_dim, points = 2, 7, 2, 4, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=generator, dtype=torch.float64)
    # far outside, near the borders and inside the maps
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=torch.float64) * 3 - 1
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator, dtype=torch.float64)
    upstream = torch.randn(batch, queries, heads * head_dim, generator=generator, dtype=torch.float64)
    gradients = []
    for function in (multi_scale_deformable_attention, multi_scale_deformable_attention_grid_sample):
        inputs = [tensor.clone().requires_grad_() for tensor in (value, locations, weights)]
        output = function(inputs[0], shapes, inputs[1], inputs[2])
        (output * upstream).sum().backward()
        gradients.append([output.detach()] + [tensor.grad for tensor in inputs])
    for ours, reference in zip(*gradients):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-11)


def test_deformable_attention_layer_uses_grid_sample_only_when_recording_gradients(monkeypatch):
    import modelscope_plugin.modeling.layers.ms_deform_attn as module

    calls = []
    for name in ("sample_bordered_values", "multi_scale_deformable_attention_grid_sample"):
        function = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *arguments, _f=function, _n=name: calls.append(_n) or _f(*arguments))
    layer = MultiScaleDeformableAttention(embed_dim=16, num_levels=2, num_heads=2, num_points=2)
    shapes = [(4, 4), (2, 2)]
    query, reference = torch.randn(1, 20, 16), torch.rand(1, 20, 2, 2)
    layer(query, reference, query, shapes).sum().backward()
    with torch.no_grad():
        inference = layer(query, reference, query, shapes)
    with torch.enable_grad():
        training = layer(query, reference, query, shapes)
    assert calls == ["multi_scale_deformable_attention_grid_sample", "sample_bordered_values",
                     "multi_scale_deformable_attention_grid_sample"]
    torch.testing.assert_close(inference, training.detach(), rtol=0, atol=1e-5)


def test_deformable_attention_layer_over_groups_of_queries_equals_one_group(monkeypatch):
    import modelscope_plugin.modeling.layers.ms_deform_attn as module

    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dim=16, num_levels=2, num_heads=2, num_points=2).eval()
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.5)  # offsets and weights that depend on the query
    torch.nn.init.normal_(layer.attention_weights.weight, std=0.5)
    shapes = [(4, 5), (2, 3)]
    query, reference = torch.randn(2, 26, 16), torch.rand(2, 26, 2, 2)
    value = torch.randn(2, 26, 16)
    with torch.no_grad():
        whole = layer(query, reference, value, shapes)
        monkeypatch.setattr(module, "SAMPLES_PER_QUERY_GROUP", 2 * 2 * 2 * 2 * 7)  # 7 queries of both images
        calls = []
        layer.sampling_offsets.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[1]))
        grouped = layer(query, reference, value, shapes)
    assert calls == [7, 7, 7, 5]
    torch.testing.assert_close(grouped, whole, rtol=0, atol=1e-6)
    with torch.enable_grad():
        reference_output = layer(query, reference, value.requires_grad_(), shapes)  # grid_sample, all queries at once
    torch.testing.assert_close(grouped, reference_output.detach(), rtol=0, atol=1e-5)


def test_sine_position_encoding_matches_formula():
    encoding = SinePositionEncoding(num_position_features=4)(torch.zeros(1, 1, 3, 5))
    scale, epsilon = 2 * math.pi, 1e-6
    row, column = 1, 3
    y = (row + 1) / (3 + epsilon) * scale
    x = (column + 1) / (5 + epsilon) * scale
    frequencies = [10000 ** (2 * (index // 2) / 4) for index in range(4)]
    expected_y = [math.sin(y / frequencies[0]), math.cos(y / frequencies[1]), math.sin(y / frequencies[2]), math.cos(y / frequencies[3])]
    expected_x = [math.sin(x / frequencies[0]), math.cos(x / frequencies[1]), math.sin(x / frequencies[2]), math.cos(x / frequencies[3])]
    np.testing.assert_allclose(encoding[0, :, row, column].numpy(), expected_y + expected_x, atol=1e-6)


def test_relative_position_index_is_swin_convention():
    window = 3
    index = relative_position_index(window)
    # token (0, 0) vs token (2, 1): relative (-2, -1) -> ((-2 + 2) * 5 + (-1 + 2))
    assert index[0, 2 * window + 1] == 1
    assert index[2 * window + 1, 0] == (2 + 2) * 5 + (1 + 2)
    assert index.shape == (9, 9) and index.max() == (2 * window - 1) ** 2 - 1



@pytest.mark.parametrize("height, width, window", [(7, 7, 7), (14, 21, 7), (12, 6, 3), (24, 48, 12), (8, 12, 4)])
def test_masked_windows_are_exactly_those_whose_shifted_mask_is_not_zero(height, width, window):
    full_mask = shifted_window_attention_mask(height, width, window, window // 2, "cpu")
    mask = masked_shifted_windows(height, width, window, window // 2, "cpu")
    assert mask.windows == full_mask.flatten(1).ne(0).any(1).nonzero().flatten().tolist()
    assert torch.equal(mask.mask, full_mask[mask.windows]) and mask.num_windows == len(full_mask)

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_shifted_window_attention_equals_the_full_mask_formula(autocast, grouped, monkeypatch):
    """Only the windows a shift mixes get the mask; every window must equal softmax(q k^T / sqrt(d) + bias + mask) v
    with the full (num_windows, N, N) mask, for each image of a batch; also over groups of 5 windows, which split
    both images' masked windows between groups."""
    import modelscope_plugin.modeling.layers.row_groups as row_groups

    if grouped:
        monkeypatch.setattr(row_groups, "GROUP_ELEMENTS", 5 * 9 * 24)  # 5 windows of 9 tokens x 24 qkv channels
        monkeypatch.setattr(row_groups, "MIN_ROWS_PER_CHANNEL", 0)
    torch.manual_seed(0)
    window, heads, channels, height, width, batch = 3, 2, 8, 9, 12, 2
    attention = WindowAttention(channels, heads, window).eval()
    full_mask = shifted_window_attention_mask(height, width, window, window // 2, "cpu")  # (12 windows, 9, 9)
    mask = masked_shifted_windows(height, width, window, window // 2, "cpu")
    assert mask.windows == [3, 7, 8, 9, 10, 11]  # the last column and the last row of the 3 x 4 windows
    windows = window_partition(torch.randn(batch, height, width, channels), window)  # (24, 9, 8)
    # the attention takes the masked windows of both images last
    masked_rows = [image * len(full_mask) + window_index for image in range(batch) for window_index in mask.windows]
    order = [row for row in range(len(windows)) if row not in masked_rows] + masked_rows
    calls = []
    attention.qkv.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ordered_output = attention(windows[order], mask.mask.repeat(batch, 1, 1))
        assert calls == ([5, 5, 2] * 2 if grouped else [12, 12])
        output = torch.empty_like(ordered_output)
        output[order] = ordered_output
        dtype = torch.bfloat16 if autocast else torch.float32
        qkv = torch.nn.functional.linear(windows.to(dtype), attention.qkv.weight.to(dtype), attention.qkv.bias.to(dtype))
    query, key, value = qkv.double().view(len(windows), window * window, 3, heads, channels // heads).permute(
        2, 0, 3, 1, 4)
    bias = attention.relative_position_bias_table[attention.relative_position_index.reshape(-1)].double()
    bias = bias.view(window * window, window * window, heads).permute(2, 0, 1)
    logits = query @ key.transpose(-1, -2) / math.sqrt(channels // heads) + bias + full_mask.double().repeat(
        batch, 1, 1)[:, None]
    attended = (logits.softmax(-1) @ value).transpose(1, 2).reshape(len(windows), window * window, channels)
    expected = attended @ attention.proj.weight.double().T + attention.proj.bias.double()
    tolerance = 1e-2 if autocast else 1e-6
    torch.testing.assert_close(output.double(), expected, rtol=0, atol=tolerance)
    # the masked windows differ from attention with the bias alone: the mask is applied, to both images
    unmasked_logits = logits - full_mask.double().repeat(batch, 1, 1)[:, None]
    unmasked = ((unmasked_logits.softmax(-1) @ value).transpose(1, 2).reshape(len(windows), window * window, channels)
                @ attention.proj.weight.double().T + attention.proj.bias.double())
    assert ((output.double() - unmasked).abs().amax(dim=(1, 2))[masked_rows] > 0.1).all()

@pytest.mark.parametrize("height, width, window, shift, masked", [
    (9, 12, 3, 1, [3, 7, 8, 9, 10, 11]), (10, 13, 3, 1, [4, 9]), (7, 7, 7, 0, []), (8, 5, 4, 2, [1, 2, 3])])
def test_window_rows_are_pad_roll_partition_and_their_inverse(height, width, window, shift, masked):
    batch, channels = 2, 3
    features = torch.randn(batch, height, width, channels)
    padded = torch.nn.functional.pad(features, (0, 0, 0, (-width) % window, 0, (-height) % window))
    expected = window_partition(torch.roll(padded, shifts=(-shift, -shift), dims=(1, 2)), window)
    # the unmasked windows of both images, then the masked windows of both images
    num_windows = len(expected) // batch
    masked_rows = [image * num_windows + index for image in range(batch) for index in masked]
    expected = expected[[row for row in range(len(expected)) if row not in masked_rows] + masked_rows]
    rows = window_rows(batch, height, width, window, shift, "cpu", masked)
    windows = padded.reshape(-1, channels).index_select(0, rows.partition).view(expected.shape)
    assert torch.equal(windows, expected)
    back = windows.view(-1, channels).index_select(0, rows.reverse).view(batch, height, width, channels)
    assert torch.equal(back, features)


def test_swin_block_over_groups_equals_one_pass(monkeypatch):
    """Inference runs the norm, the windows' attention and the MLP over groups (into the block's own new tensor);
    the result must be the one pass's, with the shift, the padding and a batch of two."""
    import modelscope_plugin.modeling.layers.row_groups as row_groups

    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=3, shifted=True).eval()
    tokens = torch.randn(2, 10 * 13, 8)  # padded to 12 x 15: 20 windows per image
    with torch.no_grad():
        whole = block(tokens, 10, 13)
        # 36 rows of qkv (4 windows of 9 tokens x 24 channels), 27 rows of the MLP (32 hidden channels)
        monkeypatch.setattr(row_groups, "GROUP_ELEMENTS", 36 * 24)
        monkeypatch.setattr(row_groups, "MIN_ROWS_PER_CHANNEL", 0)
        calls = {"fc1": [], "qkv": []}
        block.mlp.fc1.register_forward_hook(lambda module, inputs, output: calls["fc1"].append(inputs[0].shape[0]))
        block.attn.qkv.register_forward_hook(lambda module, inputs, output: calls["qkv"].append(inputs[0].shape[0]))
        copy = tokens.clone()
        grouped = block(tokens, 10, 13)
    assert calls == {"fc1": [27] * 9 + [17], "qkv": [4] * 10}
    assert torch.equal(tokens, copy)  # the input is not written
    torch.testing.assert_close(grouped, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_equals_torchvisions_on_its_seed_weights_and_names(depth):
    from torchvision.models import resnet18, resnet50

    torchvision_resnet = resnet18 if depth == 18 else resnet50
    torch.manual_seed(0)
    reference = torchvision_resnet().eval()
    after_reference = torch.rand(1)
    weights = {name: value for name, value in reference.state_dict().items() if not name.startswith("fc.")}
    torch.manual_seed(0)
    resnet = ResNet(depth=depth).eval()
    # the same random weights under the same seed, and the same random numbers after it
    assert list(resnet.state_dict()) == list(weights)
    assert all(torch.equal(value, weights[name]) for name, value in resnet.state_dict().items())
    assert torch.equal(torch.rand(1), after_reference)
    images = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        features = resnet(images)
        expected = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        for name, layer in zip(("res2", "res3", "res4", "res5"), (reference.layer1, reference.layer2, reference.layer3, reference.layer4)):
            expected = layer(expected)
            difference = (features[name] - expected).abs().max() / expected.abs().max()
            assert difference < 1e-5, (name, difference)


def test_resnet_width_scales_every_stage_and_batch_norm_can_be_trained():
    resnet = ResNet(depth=18, width=32, freeze_batch_norm=True)
    assert resnet.out_channels == {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
    assert ResNet(depth=50, width=32).out_channels == {"res2": 128, "res3": 256, "res4": 512, "res5": 1024}
    norms = [module for module in resnet.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    resnet.train()
    assert not any(norm.training or norm.weight.requires_grad for norm in norms)
    resnet.set_batch_norm_frozen(False)
    assert all(norm.training and norm.weight.requires_grad and norm.bias.requires_grad for norm in norms)
    before = norms[0].running_mean.clone()
    resnet(torch.randn(2, 3, 64, 64))
    assert not torch.equal(before, norms[0].running_mean)  # statistics are updated in training
    resnet.set_batch_norm_frozen(True)
    assert not any(norm.training or norm.weight.requires_grad for norm in norms)
    with pytest.raises(ValueError, match="depth must be one of \\[18, 34, 50, 101\\], got 26"):
        ResNet(depth=26)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_inference_folds_batch_norm_into_the_convolutions_and_refolds_after_a_weight_change(depth):
    torch.manual_seed(0)
    resnet = ResNet(depth=depth).eval()
    with torch.no_grad():  # frozen statistics far from the identity, as trained networks have
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.3, 3.0)
                module.weight.uniform_(0.3, 1.5)
                module.bias.normal_(0, 0.2)
    images = torch.randn(1, 3, 96, 128)

    def unfolded():  # autograd on: every convolution, then its batch norm
        with torch.enable_grad():
            return {name: feature.detach() for name, feature in resnet(images).items()}

    def relative_differences(folded, reference):
        return {name: ((folded[name] - reference[name]).abs().max() / reference[name].abs().max()).item() for name in reference}

    with torch.no_grad():
        folded = resnet(images)
    assert all(difference < 1e-5 for difference in relative_differences(folded, unfolded()).values())
    assert all(feature.is_contiguous() for feature in folded.values())  # see the module docstring: group norm accuracy
    with torch.no_grad():
        last = resnet.layer4[-1]  # an in-place change (loading a checkpoint) must refold
        (last.conv3 if depth == 50 else last.conv2).weight.mul_(3.0)
        (last.bn3 if depth == 50 else last.bn2).running_var.mul_(0.5)
        changed = resnet(images)
    reference = unfolded()
    assert (changed["res5"] - folded["res5"]).abs().max() > 1e-2 * folded["res5"].abs().max()
    assert relative_differences(changed, reference)["res5"] < 1e-5


def test_backbones_declare_channels_and_strides_on_odd_sizes():
    swin = SwinTransformer(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.0).eval()
    for backbone in (swin, ResNet(depth=50).eval(), ResNet(depth=18, width=16).eval()):
        with torch.no_grad():
            features = backbone(torch.randn(1, 3, 99, 131))
        for name, feature in features.items():
            stride = backbone.out_strides[name]
            assert feature.shape[1] == backbone.out_channels[name]
            assert feature.shape[-2:] == (math.ceil(99 / stride), math.ceil(131 / stride)), (name, feature.shape)
