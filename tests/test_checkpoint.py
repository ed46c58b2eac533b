"""Checkpoint reading is safe and strict; config files are read without being executed."""
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import tiny_config

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints import io as checkpoint
from modelscope_plugin.checkpoints import keymaps
from modelscope_plugin.model_dirs.mmcv_config import read_mmcv_config


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/modelscope_plugin_pwned",))


@pytest.mark.parametrize("suffix", [".pt", ".pkl"])
def test_pickle_carrying_code_is_refused(tmp_path, suffix):
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": {"x": torch.zeros(1)}, "meta": RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"model": {"x": np.zeros(1)}, "payload": RunsCode()}))
    with pytest.raises(checkpoint.CheckpointError, match="refus"):
        checkpoint.read_checkpoint(path)
    assert not os.path.exists("/tmp/modelscope_plugin_pwned")


def test_detectron2_pickle_with_numpy_arrays_loads(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps({"model": {"sem_seg_head.predictor.query_feat.weight": np.ones((3, 4), np.float32)},
                                   "__author__": "Mask2Former"}))
    state = checkpoint.extract_state_dict(checkpoint.read_checkpoint(path))
    assert torch.equal(state["sem_seg_head.predictor.query_feat.weight"], torch.ones(3, 4))


def test_truncated_and_missing_files_name_the_file(tmp_path):
    network = build_mask2former(tiny_config())
    path = tmp_path / "pytorch_model.pt"
    torch.save({"state_dict": network.state_dict()}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="pytorch_model.pt"):
        checkpoint.read_checkpoint(path)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read_checkpoint(tmp_path / "absent.pt")


def test_strict_loading_lists_every_mismatch():
    network = build_mask2former(tiny_config())
    state = dict(network.state_dict())
    state.pop("transformer_decoder.query_feat.weight")
    state["transformer_decoder.surplus"] = torch.zeros(1)
    state["transformer_decoder.class_embed.weight"] = torch.zeros(5, 64)
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_strict(network, state, "demo.pt")
    message = str(error.value)
    assert "query_feat.weight" in message and "transformer_decoder.surplus" in message and "(5, 64)" in message


def test_unfold_order_round_trip_and_meaning():
    channels = 3
    # a reduction weight whose input index i holds value i in the original Swin order (neighbour-major)
    swin = torch.arange(4 * channels, dtype=torch.float32)[None].repeat(2, 1)
    unfold = keymaps.swin_to_unfold_order(swin, dim=1)
    # nn.Unfold order: channel-major, kernel positions (0,0), (0,1), (1,0), (1,1); Swin's: (0,0), (1,0), (0,1), (1,1)
    swin_position = {0: 0, 1: 2, 2: 1, 3: 3}
    expected = [swin_position[k] * channels + c for c in range(channels) for k in range(4)]
    assert unfold[0].tolist() == expected
    assert torch.equal(keymaps.unfold_to_swin_order(unfold, dim=1), swin)


def test_mmcv_config_read_without_execution(tmp_path):
    config = tmp_path / "config.py"
    config.write_text(
        "import os\nos.system('echo pwned > /tmp/modelscope_plugin_cfg')\n"
        "num_things_classes = 80\nnum_stuff_classes = 53\nnum_classes = num_things_classes + num_stuff_classes\n"
        "model = dict(type='Mask2Former', panoptic_head=dict(num_queries=200, num_classes=num_classes,\n"
        "             in_channels=[192, 384, 768, 1536]), test_cfg=dict(iou_thr=0.8))\n"
        "custom = {f'k{i}': i for i in range(3)}\n")
    values = read_mmcv_config(config)
    assert values["model"]["panoptic_head"]["num_classes"] == 133
    assert values["model"]["panoptic_head"]["in_channels"] == [192, 384, 768, 1536]
    assert "custom" not in values and not os.path.exists("/tmp/modelscope_plugin_cfg")
