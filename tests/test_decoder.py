"""The masked-attention decoder's shortcuts equal the reference formulation."""
import torch
import torch.nn.functional as F

from conftest import shape_weights, tiny_config
from modelscope_plugin.builders import build_mask2former


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
