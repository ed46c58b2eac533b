"""OneFormer finetuning output: the HF OneFormer writer (``checkpoints/oneformer.py`` ``to_hf_oneformer``,
``model_dirs/oneformer.py`` ``write_hub_oneformer_dir``) read back exactly, and its names equal transformers'."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_oracle
from safetensors.torch import load_file
from test_oneformer_model import tiny_oneformer_config

from modelscope_plugin.builders import build_oneformer
from modelscope_plugin.checkpoints.oneformer import to_hf_oneformer
from modelscope_plugin.config import DinatConfig, OneFormerTextMapperConfig, SwinConfig
from modelscope_plugin.errors import KeymapError
from modelscope_plugin.model_dirs.load import load_model
from modelscope_plugin.model_dirs.oneformer import load_hf_oneformer_dir, write_hub_oneformer_dir

SWIN = SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
DINAT = DinatConfig(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), kernel_size=3,
                    dilations=((2,), (1,), (1, 2), (2,)), mlp_ratio=2.0, layer_scale_init=0.5)
TEXT_MAPPER = OneFormerTextMapperConfig(context_length=8, width=64, num_layers=1, projector_layers=2, num_context=2)


def tiny_config(backbone=SWIN, text_mapper=TEXT_MAPPER):
    """5 classes (3 things), 6 queries, width 64 (the text mapper's heads are width // 64), CLIP's vocabulary."""
    config = replace(tiny_oneformer_config(backbone), hidden_dim=64, text_mapper=text_mapper,
                     class_names=("cat", "dog", "car", "grass", "sky"), category_ids=(3, 5, 7, 11, 13),
                     num_things_classes=3, num_stuff_classes=2)
    return config


@pytest.mark.parametrize("backbone", [SWIN, DINAT], ids=["swin", "dinat"])
@pytest.mark.parametrize("with_text_mapper", [True, False], ids=["text_mapper", "inference"])
def test_writer_round_trip_is_exact(tmp_path, backbone, with_text_mapper):
    config = tiny_config(backbone, TEXT_MAPPER if with_text_mapper else None)
    config.preprocess.short_side, config.preprocess.long_side_max = 96, 160
    config.task = "instance"
    torch.manual_seed(0)
    network = build_oneformer(config)
    written = write_hub_oneformer_dir(tmp_path / "out", config, network, logit_scale=torch.tensor(2.5))
    loaded_config, loaded = load_model(written)
    original, read_back = network.state_dict(), loaded.state_dict()
    assert set(read_back) == set(original)
    assert any(key.startswith("text_mapper.") for key in read_back) == with_text_mapper
    for key, tensor in original.items():
        assert torch.equal(read_back[key], tensor), key
    assert loaded_config == config
    # the HF folder alone keeps the network, the text mapper and the preprocessing (classes: by count only)
    hf_config, hf_network = load_hf_oneformer_dir(written)
    assert hf_config.text_mapper == config.text_mapper and hf_config.preprocess == config.preprocess
    assert hf_config.class_names == config.class_names and hf_config.category_ids == (0, 1, 2, 3, 4)
    weights = load_file(written / "model.safetensors")
    assert float(weights["criterion.logit_scale"]) == 2.5
    assert json.loads((written / "config.json").read_text())["is_training"] == with_text_mapper


def test_writer_refuses_a_key_it_has_no_name_for():
    network = build_oneformer(tiny_config())
    state_dict = dict(network.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(KeymapError, match="extra.weight"):
        to_hf_oneformer(state_dict, "swin")


@pytest.mark.oracle
@pytest.mark.parametrize("backbone", ["swin", "dinat"])
def test_written_folder_has_transformers_names_and_values(tmp_path, backbone):
    """A transformers-made training folder (text mapper saved), read and written back: every tensor of the
    original under the same name, except the loss's empty-class weights, which the network does not hold."""
    pixels = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels)
    arguments = ["--backbone", backbone, "--training", "--layer-scale", "0.5"] if backbone == "dinat" \
        else ["--training"]
    run_oracle("oneformer_oracle.py", "make", *arguments, "--calibration-pixels", tmp_path / "pixels.npz",
               "--out-dir", tmp_path / "hf")
    config, network = load_model(tmp_path / "hf")
    assert config.text_mapper is not None
    original = load_file(tmp_path / "hf" / "model.safetensors")
    written = load_file(write_hub_oneformer_dir(tmp_path / "out", config, network,
                                                original["criterion.logit_scale"]) / "model.safetensors")
    assert set(original) - set(written) == {"criterion.empty_weight"} and set(written) <= set(original)
    for key, tensor in written.items():
        if "swin.layernorm" not in key:  # never applied by the backbone; written with its initial values
            assert torch.equal(tensor, original[key]), key
