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
    import modelscope_plugin.modeling.mask2former.transformer_decoder as decoder_module

    torch.manual_seed(0)
    layer = FeedForwardLayer(16, 48).eval()
    rows = torch.randn(37, 2, 16)
    with torch.no_grad():
        whole = layer(rows)
        monkeypatch.setattr(decoder_module, "FEEDFORWARD_CHUNK_ELEMENTS", 5 * 2 * 48)  # 5 rows per group, 8 groups
        calls = []
        layer.linear1.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
        grouped = layer(rows)
    assert calls == [5] * 7 + [2]
    reference = layer.norm(rows + layer.linear2(torch.relu(layer.linear1(rows))))
    assert (grouped - reference).abs().max() < 1e-6 and (whole - reference).abs().max() < 1e-6
