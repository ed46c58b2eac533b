"""EoMT's own network: shapes, the square-input contract, and masked attention following its probability buffer."""
import pytest
import torch

from modelscope_plugin.builders import build_eomt
from modelscope_plugin.config import EomtConfig, eomt_large_coco_panoptic
from modelscope_plugin.modeling.mask2former.model import Mask2FormerOutput


def tiny_eomt_config(**overrides) -> EomtConfig:
    values = dict(hidden_dim=64, num_layers=4, num_heads=4, mlp_dim=256, image_size=64, patch_size=16,
                  num_register_tokens=2, num_query_blocks=2, num_queries=10, num_things_classes=3, num_stuff_classes=2)
    values.update(overrides)
    return EomtConfig(**values)


def test_published_defaults():
    config = eomt_large_coco_panoptic()
    assert (config.hidden_dim, config.num_layers, config.num_heads, config.image_size, config.patch_size) == (
        1024, 24, 16, 640, 16)
    assert (config.num_register_tokens, config.num_query_blocks, config.num_queries) == (4, 4, 200)
    assert config.num_classes == 133


def test_output_shapes_and_input_size():
    torch.manual_seed(0)
    network = build_eomt(tiny_eomt_config()).eval()
    with torch.no_grad():
        output = network(torch.randn(2, 3, 64, 64))
    assert isinstance(output, Mask2FormerOutput)
    # 4x4 patch grid, two x2 upscale layers -> 16x16 masks (stride 4)
    assert output.class_logits.shape == (2, 10, 6)
    assert output.mask_logits.shape == (2, 10, 16, 16)
    assert output.auxiliary_class_logits == []
    with pytest.raises(ValueError, match="patch grid"):
        network(torch.randn(1, 3, 96, 96))


def test_swiglu_variant_runs():
    network = build_eomt(tiny_eomt_config(swiglu_mlp=True)).eval()
    # 64 * 4 = 256 -> 2/3 -> 170 -> rounded up to 176
    assert network.blocks[0].mlp.gate.out_features == 176
    assert network(torch.randn(1, 3, 64, 64)).mask_logits.shape == (1, 10, 16, 16)


def test_dinov3_variant_has_rotary_embeddings_and_no_position_embeddings():
    network = build_eomt(tiny_eomt_config(rope_theta=100.0)).eval()
    assert network.embeddings.position_embeddings is None
    # 16 patches, head_dim 16
    assert network.rotary_embedding.cos.shape == (16, 16)
    assert not any("cos" in key or "position" in key for key in network.state_dict())
    assert network(torch.randn(1, 3, 64, 64)).mask_logits.shape == (1, 10, 16, 16)


def test_masked_attention_follows_probabilities():
    torch.manual_seed(0)
    network = build_eomt(tiny_eomt_config()).eval()
    pixels = torch.randn(1, 3, 64, 64)
    outputs, decisions = {}, {}
    for name, probabilities in (("masked", [1.0, 1.0]), ("unmasked", [0.0, 0.0]), ("high", [0.7, 0.5]),
                                ("low", [0.3, 0.2]), ("last only", [0.0, 1.0])):
        network.attention_mask_probabilities.copy_(torch.tensor(probabilities))
        decisions[name] = network.masked_blocks()
        with torch.no_grad():
            outputs[name] = network(pixels, return_auxiliary=True)
        # a prediction before every query block, masked or not
        assert len(outputs[name].auxiliary_mask_logits) == 2
    assert decisions["masked"] == [True, True] and decisions["unmasked"] == [False, False]
    assert decisions["last only"] == [False, True] and decisions["high"] == [True, True]
    assert decisions["low"] == [False, False]
    assert not torch.allclose(outputs["masked"].mask_logits, outputs["unmasked"].mask_logits)
    # the deterministic rule: >= 0.5 masks, below does not
    torch.testing.assert_close(outputs["high"].mask_logits, outputs["masked"].mask_logits, rtol=0, atol=0)
    torch.testing.assert_close(outputs["low"].mask_logits, outputs["unmasked"].mask_logits, rtol=0, atol=0)
