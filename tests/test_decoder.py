"""The masked-attention decoder's shortcuts equal the reference formulation."""
import torch
import torch.nn.functional as F
from conftest import shape_weights, tiny_config

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.modeling.mask2former.transformer_decoder import FeedForwardLayer, masked_multi_head_attention


def test_attention_logits_equal_resized_full_resolution_masks_and_eval_skips_only_auxiliary_outputs():
    """Reference (detectron2/mmdet): attention-mask logits = bilinear resize of each stage's stride-4 mask logits.
    Here they come from the resized mask features; in float64 the two agree to rounding, and the last stage's
    logits do not depend on whether the auxiliary stages were returned."""
    torch.manual_seed(0)
    network = build_mask2former(tiny_config()).double().eval()
    shape_weights(network)
    images = torch.randn(2, 3, 160, 224, dtype=torch.float64)
    decoder = network.transformer_decoder
    captured = []
    original_predict = decoder.predict

    def predict(queries, mask_features, attention_features):
        prediction = original_predict(queries, mask_features, attention_features)
        captured.append(prediction)
        return prediction

    decoder.predict = predict
    with torch.no_grad():
        full = network(images, return_auxiliary=True)
        captured_full, captured[:] = list(captured), []
        plain = network(images)
    del decoder.predict
    stages = full.auxiliary_mask_logits + [full.mask_logits]
    assert len(stages) == decoder.num_layers + 1 and plain.auxiliary_mask_logits == []
    for stage, prediction in enumerate(captured_full[:-1]):
        reference = F.interpolate(stages[stage], size=prediction.attention_logits.shape[-2:], mode="bilinear", align_corners=False)
        torch.testing.assert_close(prediction.attention_logits, reference, rtol=0, atol=1e-10)
        # a meaningful comparison: the masks are neither empty nor full
        assert 0.01 < (reference > 0).double().mean() < 0.99
    torch.testing.assert_close(plain.mask_logits, full.mask_logits, rtol=0, atol=0)
    torch.testing.assert_close(plain.class_logits, full.class_logits, rtol=0, atol=0)


def test_masked_attention_with_one_mask_for_all_heads_equals_multihead_attention_with_it_repeated():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(32, 4)
    query, key, value = torch.randn(7, 2, 32, requires_grad=True), torch.randn(11, 2, 32), torch.randn(11, 2, 32)
    blocked = torch.rand(2, 7, 11) < 0.5
    blocked[:, :, 3] = False  # every query attends somewhere
    ours = masked_multi_head_attention(attention, query, key, value, blocked)
    # nn.MultiheadAttention's convention: (B * heads, Lq, Lk), image-major
    theirs = attention(query, key, value, attn_mask=blocked.repeat_interleave(4, 0), need_weights=False)[0]
    assert (ours - theirs).abs().max() < 1e-6
    assert (ours - attention(query, key, value, need_weights=False)[0]).abs().max() > 1e-2  # the mask matters
    ours_gradient, = torch.autograd.grad(ours.square().sum(), query)
    theirs_gradient, = torch.autograd.grad(theirs.square().sum(), query)
    assert (ours_gradient - theirs_gradient).abs().max() < 1e-5
    unmasked = masked_multi_head_attention(attention, query, key, value, None)
    assert (unmasked - attention(query, key, value, need_weights=False)[0]).abs().max() < 1e-6


def test_feed_forward_over_groups_of_rows_equals_one_pass(monkeypatch):
    import modelscope_plugin.modeling.layers.row_groups as row_groups

    torch.manual_seed(0)
    layer = FeedForwardLayer(16, 48).eval()
    rows = torch.randn(37, 2, 16)
    with torch.no_grad():
        whole = layer(rows)
        monkeypatch.setattr(row_groups, "GROUP_ELEMENTS", 10 * 48)  # 74 rows: 10 per group, 8 groups
        monkeypatch.setattr(row_groups, "MIN_ROWS_PER_CHANNEL", 0)
        calls = []
        layer.linear1.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
        grouped = layer(rows)
    assert calls == [10] * 7 + [4]
    reference = layer.norm(rows + layer.linear2(torch.relu(layer.linear1(rows))))
    assert grouped.shape == rows.shape
    assert (grouped - reference).abs().max() < 1e-6 and (whole - reference).abs().max() < 1e-6


def test_map_row_groups_writes_in_place_and_leaves_autograd_alone(monkeypatch):
    import modelscope_plugin.modeling.layers.row_groups as row_groups

    monkeypatch.setattr(row_groups, "GROUP_ELEMENTS", 4 * 6)  # 4 rows of 6 hidden values per group
    monkeypatch.setattr(row_groups, "MIN_ROWS_PER_CHANNEL", 0)
    inputs = torch.randn(3, 5, 2)  # 15 rows: groups of 4, 4, 4, 3
    weight = torch.randn(2, 6)

    def rowwise(rows):  # each row's output depends on that row alone
        hidden = torch.tanh(rows @ weight)
        return rows * hidden.sum(-1, keepdim=True) + hidden[..., :2]

    expected = rowwise(inputs)
    calls = []
    counted = lambda rows: calls.append(rows.numel() // 2) or rowwise(rows)  # noqa: E731
    with torch.no_grad():
        in_place = inputs.clone()
        result = row_groups.map_row_groups(counted, in_place, 6, out=in_place)
    assert calls == [4, 4, 4, 3] and result is in_place
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)
    calls.clear()
    recorded = row_groups.map_row_groups(counted, inputs.clone().requires_grad_(), 6)
    assert calls == [15] and recorded.requires_grad
