"""Parity with transformers' EomtForUniversalSegmentation: random-weight ``save_pretrained`` folders (written by
tests/oracles/eomt_oracle.py in the oracle environment) loaded through ``load_model`` and this package's key table,
both networks fed the same pixels (a COCO image resized and padded to the square input). Masked attention is
checked on (probabilities 1), off (0, trained checkpoints) and half-annealed (first block off, later on); the
DINOv3 variant (rotary embeddings, no key bias) on and off; 14-pixel patches, and no register tokens."""
import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_oracle

from modelscope_plugin.checkpoints.eomt import convert_hf_eomt
from modelscope_plugin.checkpoints.io import read_checkpoint
from modelscope_plugin.config import EomtConfig
from modelscope_plugin.errors import CheckpointError, KeymapError
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.inference.preprocess import load_image, prepare_image
from modelscope_plugin.model_dirs.load import load_model

pytestmark = pytest.mark.oracle

SMALL = ["--hidden-size", "64", "--layers", "4", "--heads", "4", "--image-size", "64", "--registers", "2",
         "--num-blocks", "2", "--queries", "12", "--labels", "7"]
LARGER = ["--hidden-size", "96", "--layers", "5", "--heads", "6", "--image-size", "96", "--registers", "3",
          "--num-blocks", "3", "--queries", "16", "--labels", "9"]
CASES = {
    "small-masked": (SMALL + ["--seed", "0", "--attn-mask-probs", "1,1"]),
    "small-unmasked": (SMALL + ["--seed", "0", "--attn-mask-probs", "0,0"]),
    "small-swiglu-masked": (SMALL + ["--seed", "2", "--attn-mask-probs", "1,1", "--swiglu"]),
    "larger-masked": (LARGER + ["--seed", "1", "--attn-mask-probs", "1,1,1"]),
    "larger-unmasked-bin": (LARGER + ["--seed", "1", "--attn-mask-probs", "0,0,0", "--torch-bin"]),
    "larger-annealing": (LARGER + ["--seed", "3", "--attn-mask-probs", "0,1,1"]),
    "dinov3-small-masked": (SMALL + ["--dinov3", "--seed", "1", "--attn-mask-probs", "1,1"]),
    "dinov3-larger-unmasked": (LARGER + ["--dinov3", "--seed", "2", "--attn-mask-probs", "0,0,0"]),
    # DINOv2's 14-pixel patches (a 4x4 grid), no register tokens; later options override SMALL's
    "patch14-no-registers-masked": (SMALL + ["--patch-size", "14", "--image-size", "56", "--registers", "0",
                                             "--seed", "4", "--attn-mask-probs", "1,1"]),
    "dinov3-patch14-masked": (SMALL + ["--dinov3", "--patch-size", "14", "--image-size", "56", "--seed", "5",
                                       "--attn-mask-probs", "1,1"]),
}
IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"


def make_model_dir(tmp_path, arguments):
    model_dir = tmp_path / "hf_eomt"
    run_oracle("eomt_oracle.py", "make", *arguments, "--out-dir", model_dir)
    return model_dir


def reference_outputs(tmp_path, model_dir, pixels):
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels.numpy())
    run_oracle("eomt_oracle.py", "run", "--model-dir", model_dir, "--pixels", tmp_path / "pixels.npz",
               "--result", tmp_path / "result.npz")
    return np.load(tmp_path / "result.npz")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    model_dir = make_model_dir(tmp_path, CASES[case])
    config, network = load_model(model_dir)
    assert isinstance(config, EomtConfig)
    rgb = load_image(str(IMAGE))
    prepared = prepare_image(rgb, config.preprocess)
    # the long side resized to the square input, the rest zero-padded
    assert prepared.tensor.shape[-2:] == (config.image_size, config.image_size)
    pixels = prepared.tensor[None].contiguous()
    reference = reference_outputs(tmp_path, model_dir, pixels)
    probabilities = [float(value) for value in CASES[case][CASES[case].index("--attn-mask-probs") + 1].split(",")]
    assert reference["attn_mask_probs"].tolist() == probabilities
    assert network.attention_mask_probabilities.tolist() == probabilities
    with torch.no_grad():
        output = network(pixels)
    report = {}
    for name, ours in (("class_queries_logits", output.class_logits), ("masks_queries_logits", output.mask_logits)):
        theirs = torch.from_numpy(reference[name])
        assert ours.shape == theirs.shape, name
        logit_range = theirs.abs().max().item()
        report[name] = (ours - theirs).abs().max().item() / logit_range
        assert report[name] < 1e-4, (name, report[name])
    print(case, json.dumps(report))
    # the comparison can fail: queries disagree on classes, masks are neither empty nor full
    assert len(set(output.class_logits[0].argmax(-1).tolist())) > 2
    coverage = (output.mask_logits[0] > 0).float().mean((1, 2))
    assert 0.05 < coverage.median() < 0.9
    # the rotary embeddings matter (DINOv3)
    if network.rotary_embedding is not None:
        network.rotary_embedding.cos.fill_(1.0)
        network.rotary_embedding.sin.zero_()
        with torch.no_grad():
            unrotated = network(pixels)
        assert (unrotated.mask_logits - output.mask_logits).abs().max() > 1e-2
        return
    # and masked attention changes the result where the checkpoint asks for it
    if any(probabilities):
        network.attention_mask_probabilities.zero_()
        with torch.no_grad():
            unmasked = network(pixels)
        assert (unmasked.mask_logits - output.mask_logits).abs().max() > 1e-2


def test_key_table_is_strict(tmp_path):
    model_dir = make_model_dir(tmp_path, SMALL + ["--seed", "0"])
    state_dict = read_checkpoint(model_dir / "model.safetensors")
    converted, dropped = convert_hf_eomt(state_dict)
    assert set(dropped) == {"criterion.empty_weight"}
    # q, k and v of one block are stacked into one tensor, in that order
    qkv = converted["blocks.1.attention.qkv.weight"]
    torch.testing.assert_close(qkv[64:128], state_dict["layers.1.attention.k_proj.weight"], rtol=0, atol=0)
    with pytest.raises(KeymapError, match="no rule"):
        convert_hf_eomt({**state_dict, "layers.0.attention.extra.weight": torch.zeros(1)})
    with pytest.raises(KeymapError, match="need all three"):
        convert_hf_eomt({key: value for key, value in state_dict.items() if key != "layers.2.attention.v_proj.bias"})
    # a tensor missing from the file is named by load_strict
    from safetensors.torch import save_file
    save_file({key: value for key, value in state_dict.items() if key != "mask_head.fc2.bias"},
              str(model_dir / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mask_head.fc2.bias"):
        load_model(model_dir)


def test_unsupported_dinov3_options_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "eomt_dinov3", "use_gated_mlp": True}))
    with pytest.raises(CheckpointError, match="use_gated_mlp"):
        load_model(tmp_path)


def test_predictor_serves_an_eomt_folder(tmp_path):
    """The package's pre- and post-processing answer with an EoMT network as with Mask2Former: masks at the
    original image size. (7 classes are read as all stuff, so the instance task has nothing to answer.)"""
    config, network = load_model(make_model_dir(tmp_path, SMALL + ["--seed", "0", "--attn-mask-probs", "0,0"]))
    predictor = Predictor(network, config)
    rgb = load_image(str(IMAGE))
    assert config.num_things_classes == 0
    for task in ("panoptic", "semantic", "instance"):
        parameters = predictor.parameters(task=task, object_mask_threshold=0.0, score_thr=0.0)
        result = predictor.predict_prepared([predictor.prepare(str(IMAGE), task)], parameters)[0]
        assert bool(result["masks"]) == (task != "instance"), task
        assert all(mask.shape == rgb.shape[:2] for mask in result["masks"]), task


def test_preprocessing_matches_eomt_image_processor(tmp_path):
    """EomtConfig's preprocessing (long side to 640, torchvision's antialiased bilinear, black padding to 640x640)
    gives transformers' EomtImageProcessor(do_pad=True) pixels on COCO images and photos of several shapes."""
    paths = sorted((SHARED_DATA / "coco" / "val2017").glob("*.jpg")) + sorted((SHARED_DATA / "photos").glob("*"))
    run_oracle("eomt_oracle.py", "preprocess", "--images", *paths, "--size", "640", "--result", tmp_path / "pp.npz")
    reference = np.load(tmp_path / "pp.npz")
    config = EomtConfig()
    for index, path in enumerate(paths):
        ours = prepare_image(load_image(str(path)), config.preprocess).tensor
        theirs = torch.from_numpy(reference[f"pixel_values_{index}"])
        assert ours.shape == theirs.shape == (3, 640, 640), path.name
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=path.name)


def test_modelscope_pipeline_serves_an_eomt_directory(tmp_path):
    """An HF EoMT folder with a configuration.json (model type "eomt") runs through ModelScope's pipeline()."""
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    model_dir = make_model_dir(tmp_path, SMALL + ["--seed", "0", "--attn-mask-probs", "0,0"])
    (model_dir / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "eomt"},
        "pipeline": {"type": "image-panoptic-segmentation"}}))
    segmenter = pipeline(Tasks.image_segmentation, model=str(model_dir), device="cpu")
    result = segmenter(str(IMAGE), task="semantic")
    rgb = load_image(str(IMAGE))
    assert result["masks"] and all(mask.shape == rgb.shape[:2] for mask in result["masks"])
    assert set(result["labels"]) <= {f"class_{index}" for index in range(7)}
