"""Every mmdet 2.x Mask2Former layout (Swin-T/S/B/L, R50/R101) maps onto this package's network, strictly.

The layouts come from mmdet's own configs, built by mmdet in the oracle environment; this package reads the
same (flattened) config without executing it, builds its network and must accept exactly those keys and shapes.
"""
import json

import pytest
import torch
from conftest import run_oracle

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints import io as checkpoint
from modelscope_plugin.checkpoints import keymaps
from modelscope_plugin.config import swin_large_coco_panoptic
from modelscope_plugin.model_dirs.mask2former import config_from_mmdet
from modelscope_plugin.model_dirs.mmcv_config import read_mmcv_config

pytestmark = pytest.mark.oracle

CONFIGS = [
    "mask2former_swin-t-p4-w7-224_lsj_8x2_50e_coco-panoptic.py",
    "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco-panoptic.py",
    "mask2former_swin-b-p4-w12-384_lsj_8x2_50e_coco-panoptic.py",
    "mask2former_swin-l-p4-w12-384-in21k_lsj_16x1_100e_coco-panoptic.py",
    "mask2former_r50_lsj_8x2_50e_coco-panoptic.py",
    "mask2former_r101_lsj_8x2_50e_coco-panoptic.py",
]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mmdet_layouts")
    run_oracle("mmdet_keys_oracle.py", directory, *CONFIGS)
    return directory


@pytest.mark.parametrize("name", CONFIGS)
def test_mmdet_layout_loads_strictly(layouts, name):
    directory = layouts / name[:-3]
    config = config_from_mmdet(read_mmcv_config(directory / "config.py"), swin_large_coco_panoptic())
    shapes = json.loads((directory / "shapes.json").read_text())
    state_dict = {key: torch.zeros(shape) for key, shape in shapes.items()}
    for key in state_dict:
        if key.endswith("relative_position_index"):
            window = int(round(shapes[key][0] ** 0.5))
            from modelscope_plugin.modeling.backbones.swin import relative_position_index

            state_dict[key] = relative_position_index(window)
        elif key.endswith("num_batches_tracked"):
            state_dict[key] = torch.zeros((), dtype=torch.long)
    network = build_mask2former(config)
    checkpoint.load_strict(network, keymaps.convert_to_native(state_dict, "mmdet"), name)
    expected_queries = 200 if "swin-l" in name else 100
    assert network.transformer_decoder.query_feat.weight.shape[0] == expected_queries
