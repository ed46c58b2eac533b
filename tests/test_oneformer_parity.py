"""Parity with transformers' OneFormerForUniversalSegmentation: random-weight ``save_pretrained`` folders (written by
tests/oracles/oneformer_oracle.py in the oracle environment) loaded through ``load_model`` and this package's key
table, both networks fed the same pixels (a COCO image resized and padded by this package) and told each task, the
reference through OneFormerProcessor's task inputs from a real CLIP tokenizer, this package through its constant
token ids. Swin and DiNAT backbones (DiNAT's NATTEN kernels replaced by tests/oracles/natten_reference.py, see the
oracle's docstring), several sizes and seeds, with and without the task norm and DiNAT's layer scales, maps smaller
than a DiNAT window (padding), safetensors and pytorch_model.bin."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_oracle

from modelscope_plugin.checkpoints.io import read_checkpoint
from modelscope_plugin.checkpoints.oneformer import convert_hf_oneformer
from modelscope_plugin.config import DinatConfig, OneFormerConfig, SwinConfig
from modelscope_plugin.errors import CheckpointError, KeymapError
from modelscope_plugin.inference.preprocess import load_image, prepare_image
from modelscope_plugin.model_dirs.load import load_model
from modelscope_plugin.modeling.oneformer.task_tokens import TASK_TOKEN_IDS, task_token_ids

pytestmark = pytest.mark.oracle

TASKS = ("panoptic", "semantic", "instance")
SWIN_LARGER = ["--embed-dim", "48", "--depths", "2,2,4,2", "--backbone-heads", "2,4,6,12", "--window-size", "5",
               "--hidden", "96", "--heads", "6", "--feedforward", "160", "--encoder-layers", "3",
               "--decoder-layers", "4", "--query-layers", "1", "--queries", "16", "--labels", "9"]
DINAT_LARGER = ["--backbone", "dinat", "--embed-dim", "48", "--depths", "2,2,1,1", "--backbone-heads", "2,4,6,12",
                "--kernel-size", "5", "--dilations", "1,2;2,1;1;1", "--mlp-ratio", "3.0", "--hidden", "96",
                "--heads", "6", "--feedforward", "160", "--decoder-layers", "4", "--queries", "16", "--labels", "9"]
CASES = {
    "swin-small": ["--seed", "0"],
    "swin-small-no-task-norm-bin": ["--seed", "2", "--no-task-norm", "--torch-bin"],
    "swin-larger": SWIN_LARGER + ["--seed", "1"],
    "dinat-small-layer-scale": ["--backbone", "dinat", "--seed", "0", "--layer-scale", "0.5"],
    "dinat-larger": DINAT_LARGER + ["--seed", "3"],
}
IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"


def prepared_pixels(tmp_path):
    """The COCO image resized (short side 96, long side at most 128) and padded as this package prepares it."""
    preprocess = replace(OneFormerConfig().preprocess, short_side=96, long_side_max=128)
    pixels = prepare_image(load_image(str(IMAGE)), preprocess).tensor[None].contiguous()
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels.numpy())
    return pixels


def make_model_dir(tmp_path, arguments, with_result=True):
    model_dir = tmp_path / "hf_oneformer"
    result = tmp_path / "result.npz"
    run_oracle("oneformer_oracle.py", "make", *arguments, "--calibration-pixels", tmp_path / "pixels.npz",
               "--out-dir", model_dir, *(["--result", result] if with_result else []))
    return model_dir, (np.load(result) if with_result else None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    pixels = prepared_pixels(tmp_path)
    model_dir, reference = make_model_dir(tmp_path, CASES[case])
    config, network = load_model(model_dir)
    assert isinstance(config, OneFormerConfig)
    assert isinstance(config.backbone, DinatConfig if "dinat" in case else SwinConfig)
    report, outputs = {}, {}
    for task in TASKS:
        # the reference's task inputs came from OneFormerProcessor with a real CLIP tokenizer
        assert reference[f"task_inputs_{task}"].tolist() == task_token_ids(task, config.task_seq_len).tolist()
        with torch.no_grad():
            outputs[task] = network(pixels, task=task)
        for name, ours in (("class", outputs[task].class_logits), ("masks", outputs[task].mask_logits)):
            theirs = torch.from_numpy(reference[f"{name}_{task}"])
            assert ours.shape == theirs.shape, (task, name)
            report[f"{task}/{name}"] = (ours - theirs).abs().max().item() / theirs.abs().max().item()
            assert report[f"{task}/{name}"] < 1e-4, (task, name, report[f"{task}/{name}"])
    print(case, json.dumps(report))
    # the comparison can fail: on the calibrated task, queries disagree on classes and masks are partial
    panoptic = outputs["panoptic"]
    assert panoptic.class_logits.shape[1] == config.num_queries
    assert len(set(panoptic.class_logits[0].argmax(-1).tolist())) > 2
    coverage = (panoptic.mask_logits[0] > 0).float().mean((1, 2))
    assert 0.05 < coverage.median() < 0.9
    # and the task changes the answer
    for task in ("semantic", "instance"):
        difference = (outputs[task].class_logits - panoptic.class_logits).abs().max()
        assert difference > 1e-2 * panoptic.class_logits.abs().max(), task
    # the reference's wiring of the query transformer (the mask features' position encoding attended, their
    # projection as its position) matters, and so do DiNAT's dilations
    theirs = torch.from_numpy(reference["masks_panoptic"])
    query_transformer = network.query_transformer.forward
    network.query_transformer.forward = lambda queries, positions, memory, memory_positions: query_transformer(
        queries, positions, memory_positions, memory)
    with torch.no_grad():
        rewired = network(pixels, task="panoptic").mask_logits
    network.query_transformer.forward = query_transformer
    assert (rewired - theirs).abs().max() > 1e-2 * theirs.abs().max()
    if isinstance(config.backbone, DinatConfig):
        for stage in network.backbone.layers:
            for block in stage.blocks:
                block.attn.dilation = 1
        with torch.no_grad():
            undilated = network(pixels, task="panoptic").mask_logits
        assert (undilated - theirs).abs().max() > 1e-2 * theirs.abs().max()


def test_task_tokens_match_clip_tokenizers(tmp_path):
    """The constant ids equal OneFormerProcessor's task inputs (transformers' CLIPTokenizer over CLIP's vocabulary)
    and open_clip's own CLIP tokenizer, at the default length and at a shorter one."""
    for length in (77, 16):
        run_oracle("oneformer_oracle.py", "tokens", "--task-seq-len", length, "--result", tmp_path / "tokens.npz")
        reference = np.load(tmp_path / "tokens.npz")
        for task in TASKS:
            ours = task_token_ids(task, length).tolist()
            assert reference[f"processor_{task}"].tolist() == ours, (task, length)
            assert reference[f"open_clip_{task}"].tolist() == ours, (task, length)
            used = len(TASK_TOKEN_IDS[task])
            assert len(ours) == length and ours[used:] == [0] * (length - used)


def test_key_table_is_strict(tmp_path):
    prepared_pixels(tmp_path)
    model_dir, _ = make_model_dir(tmp_path, ["--seed", "0"], with_result=False)
    state_dict = read_checkpoint(model_dir / "model.safetensors")
    converted, report = convert_hf_oneformer(state_dict, "swin")
    assert set(report.dropped) == {"criterion.empty_weight", "criterion.logit_scale",
                                   "model.pixel_level_module.encoder.swin.layernorm.weight",
                                   "model.pixel_level_module.encoder.swin.layernorm.bias"}
    # q, k and v of one decoder self-attention are stacked into one tensor, in that order
    prefix = "model.transformer_module.decoder.layers.1.self_attn.self_attn."
    in_projection = converted["transformer_decoder.transformer_self_attention_layers.1.self_attn.in_proj_weight"]
    torch.testing.assert_close(in_projection[64:128], state_dict[prefix + "k_proj.weight"], rtol=0, atol=0)
    with pytest.raises(KeymapError, match="no rule"):
        convert_hf_oneformer({**state_dict, "model.task_encoder.extra.weight": torch.zeros(1)}, "swin")
    with pytest.raises(KeymapError, match="need all three"):
        convert_hf_oneformer({key: value for key, value in state_dict.items() if key != prefix + "v_proj.bias"},
                             "swin")
    with pytest.raises(KeymapError, match="'resnet'"):
        convert_hf_oneformer(state_dict, "resnet")
    # a tensor missing from the file is named by load_strict
    from safetensors.torch import save_file
    missing = "model.transformer_module.decoder.query_input_projection.bias"
    save_file({key: value for key, value in state_dict.items() if key != missing},
              str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="query_input_projection.bias"):
        load_model(model_dir)


@pytest.mark.parametrize("field, value", [("pre_norm", True), ("enforce_input_proj", True), ("mask_dim", 128)])
def test_unsupported_options_are_refused(tmp_path, field, value):
    values = {"model_type": "oneformer", "backbone_config": {"model_type": "swin", "embed_dim": 32,
                                                            "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8],
                                                            "window_size": 7}, field: value}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match=field):
        load_model(tmp_path)
