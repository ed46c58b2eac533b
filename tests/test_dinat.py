"""DiNAT's neighbourhood attention against a float64 loop reference transcribed from NATTEN's kernels
(tests/oracles/natten_reference.py), and the backbone's declared channels and strides on odd input sizes."""
import pytest
import torch
from oracles.natten_reference import natten2dav, natten2dqkrpb

from modelscope_plugin.modeling.backbones.dinat import Dinat, neighbourhood_attention, neighbourhood_windows


def reference_attention(query, key, value, bias, kernel_size, dilation):
    scores = natten2dqkrpb(query, key, bias, kernel_size, dilation)
    return natten2dav(scores.softmax(-1), value, kernel_size, dilation)


def random_inputs(height, width, kernel_size, seed, heads=2, head_dim=3):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(2, heads, height, width, head_dim, generator=generator, dtype=torch.float64)
                         for _ in range(3))
    bias = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1, generator=generator, dtype=torch.float64)
    return query, key, value, bias


# (height, width, kernel size, dilation): borders on both sides, lengths that are not multiples of the dilation,
# a window as large as the map, rectangular maps
CASES = [(9, 13, 3, 1), (11, 14, 3, 3), (10, 17, 5, 2), (7, 7, 7, 1), (12, 9, 3, 2), (15, 16, 5, 3), (6, 21, 3, 2)]


@pytest.mark.parametrize("height, width, kernel_size, dilation", CASES)
def test_neighbourhood_attention_matches_loop_reference(height, width, kernel_size, dilation):
    query, key, value, bias = random_inputs(height, width, kernel_size, seed=height * width + dilation)
    ours = neighbourhood_attention(query, key, value, bias, kernel_size, dilation)
    theirs = reference_attention(query, key, value, bias, kernel_size, dilation)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_the_comparison_can_fail():
    """Windows cut at the border instead of shifted inwards, another dilation, or a transposed bias table all change
    the answer: the reference tells them apart."""
    query, key, value, bias = random_inputs(11, 14, 3, seed=0)
    reference = reference_attention(query, key, value, bias, 3, 2)
    assert not torch.allclose(neighbourhood_attention(query, key, value, bias, 3, 1), reference, atol=1e-3)
    assert not torch.allclose(neighbourhood_attention(query, key, value, bias.transpose(1, 2), 3, 2), reference,
                              atol=1e-3)
    keys, _ = neighbourhood_windows(11, 3, 2)
    # pixel 0 sees rows 0, 2, 4 (its window shifted inwards), pixel 10 rows 6, 8, 10, pixel 9 (odd sub-grid of
    # 5 pixels: 1, 3, 5, 7, 9) rows 5, 7, 9
    assert keys[0].tolist() == [0, 2, 4] and keys[10].tolist() == [6, 8, 10] and keys[9].tolist() == [5, 7, 9]


def test_backbone_channels_and_strides_on_odd_sizes():
    torch.manual_seed(0)
    backbone = Dinat(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), kernel_size=3,
                     dilations=((2,), (1,), (1,), (1,)), mlp_ratio=2.0).eval()
    height, width = 97, 131
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, height, width))
    for name, stride in backbone.out_strides.items():
        assert features[name].shape == (1, backbone.out_channels[name], -(-height // stride), -(-width // stride))
    assert backbone.out_strides == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
