"""OneFormer through this package's entry points: ModelScope's ``pipeline()`` on a Hugging Face OneFormer folder (the
task passed through to the network), its preprocessing against transformers' OneFormerImageProcessor, and its
semantic post-processing against OneFormerImageProcessor's on the same logits."""
import json

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, run_oracle

from modelscope_plugin.config import OneFormerConfig
from modelscope_plugin.inference.postprocess import semantic_inference
from modelscope_plugin.inference.preprocess import load_image, prepare_image

pytestmark = pytest.mark.oracle

TASKS = ("panoptic", "semantic", "instance")
# 400 x 600: resized to 128 x 192, multiples of 32, so no padding separates this package's input from transformers'
IMAGE = SHARED_DATA / "photos" / "coffee.png"


def test_preprocessing_matches_oneformer_image_processor(tmp_path):
    """OneFormerConfig's preprocessing (short side 800, long side at most 1333 by transformers' size rule,
    torchvision's antialiased bilinear, ImageNet mean and std) gives OneFormerImageProcessor's pixels on COCO images
    and photos of several shapes; this package then pads bottom/right with zeros to a multiple of 32."""
    paths = sorted((SHARED_DATA / "coco" / "val2017").glob("*.jpg")) + sorted((SHARED_DATA / "photos").glob("*"))
    run_oracle("oneformer_oracle.py", "preprocess", "--images", *paths, "--result", tmp_path / "pp.npz")
    reference = np.load(tmp_path / "pp.npz")
    config = OneFormerConfig()
    for index, path in enumerate(paths):
        prepared = prepare_image(load_image(str(path)), config.preprocess)
        theirs = torch.from_numpy(reference[f"pixel_values_{index}"])
        height, width = prepared.resized_size
        assert theirs.shape == (3, height, width), path.name
        torch.testing.assert_close(prepared.tensor[:, :height, :width], theirs, rtol=0, atol=1e-5, msg=path.name)
        assert prepared.tensor[:, height:].abs().max() == 0 if height < prepared.padded_size[0] else True
        assert prepared.padded_size[0] % 32 == 0 and prepared.padded_size[1] % 32 == 0


def make_model_dir(tmp_path):
    """A random-weight HF OneFormer folder with a preprocessor_config.json asking for short side 128 / long 192."""
    config = OneFormerConfig()
    config.preprocess.short_side, config.preprocess.long_side_max = 128, 192
    pixels = prepare_image(load_image(str(IMAGE)), config.preprocess).tensor[None]
    assert pixels.shape[-2:] == (128, 192)
    np.savez(tmp_path / "pixels.npz", pixel_values=pixels.numpy())
    model_dir = tmp_path / "hf_oneformer"
    run_oracle("oneformer_oracle.py", "make", "--seed", "0", "--calibration-pixels", tmp_path / "pixels.npz",
               "--out-dir", model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 128, "longest_edge": 192}, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    return model_dir, pixels


def test_pipeline_passes_the_task_and_semantic_segments_match_transformers(tmp_path):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    model_dir, pixels = make_model_dir(tmp_path)
    segmenter = pipeline(Tasks.image_segmentation, model=str(model_dir), device="cpu")
    config, network, predictor = segmenter.config, segmenter.model.network, segmenter.predictor
    assert isinstance(config, OneFormerConfig) and config.preprocess.short_side == 128
    prepared = predictor.prepare(str(IMAGE))
    torch.testing.assert_close(prepared.tensor[None], pixels, rtol=0, atol=0)
    logits = {}
    for task in TASKS:
        with torch.no_grad():
            logits[task] = network(pixels, task=task)
        parameters = predictor.parameters(task=task, object_mask_threshold=0.0, score_thr=0.0)
        result = segmenter(str(IMAGE), task=task, object_mask_threshold=0.0, score_thr=0.0)
        # the pipeline's answer is the post-processing of the logits the network gives when told this task
        expected = predictor.postprocess(prepared, logits[task].class_logits[0], logits[task].mask_logits[0],
                                         parameters)
        assert result["labels"] == expected["labels"], task
        assert all(np.array_equal(ours, theirs) for ours, theirs in zip(result["masks"], expected["masks"])), task
        assert all(mask.shape == load_image(str(IMAGE)).shape[:2] for mask in result["masks"]), task
    # the task changes the network's answer
    assert (logits["semantic"].mask_logits - logits["panoptic"].mask_logits).abs().max() > 1e-2

    # semantic post-processing: transformers' on the same logits (the panoptic task's, whose heads the oracle
    # calibrated: classes and masks vary), at the mask resolution (no resizing on either side, so the arithmetic must
    # agree exactly) and at the image size (transformers resizes probabilities, this package logits, as mmdet and
    # detectron2 do: boundary pixels may differ)
    semantic = logits["panoptic"]
    np.savez(tmp_path / "logits.npz", class_queries_logits=semantic.class_logits.numpy(),
             masks_queries_logits=semantic.mask_logits.numpy())
    mask_size = tuple(semantic.mask_logits.shape[-2:])
    run_oracle("oneformer_oracle.py", "postprocess", "--logits", tmp_path / "logits.npz", "--task", "semantic",
               "--target-size", *mask_size, "--result", tmp_path / "semantic_low.npz")
    ours, _ = semantic_inference(semantic.class_logits[0], semantic.mask_logits[0], mask_size, mask_size, mask_size)
    theirs = np.load(tmp_path / "semantic_low.npz")["semantic"]
    assert len(np.unique(theirs)) >= 2  # a map with a boundary, where a difference would show
    np.testing.assert_array_equal(ours.numpy(), theirs)
    original_size = load_image(str(IMAGE)).shape[:2]
    run_oracle("oneformer_oracle.py", "postprocess", "--logits", tmp_path / "logits.npz", "--task", "semantic",
               "--target-size", *original_size, "--result", tmp_path / "semantic_full.npz")
    theirs = np.load(tmp_path / "semantic_full.npz")["semantic"]
    result = predictor.postprocess(prepared, semantic.class_logits[0], semantic.mask_logits[0],
                                   predictor.parameters(task="semantic"))
    agreement = float((result["sem_seg"] == theirs).mean())
    print("semantic agreement at the image size", agreement)
    assert agreement > 0.97


def test_card_validates_and_its_configuration_serves_an_hf_folder(tmp_path, capsys):
    """The OneFormer card passes ``card validate`` with an HF OneFormer folder as its weights, and that folder with
    the card's configuration.json beside it (the hub layout the card describes) runs through ``pipeline()``."""
    import shutil

    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    from modelscope_plugin.apps.cli import main

    card = REPO / "model_cards" / "shi-labs" / "oneformer_coco_swin_large"
    model_dir, _ = make_model_dir(tmp_path)
    shutil.copy(card / "configuration.json", model_dir / "configuration.json")
    assert main(["card", "validate", str(card), "--weights", str(model_dir)]) == 0, capsys.readouterr().err
    segmenter = pipeline(Tasks.image_segmentation, model=str(model_dir), device="cpu")
    assert isinstance(segmenter.config, OneFormerConfig)
    result = segmenter(str(IMAGE), task="semantic")
    assert result["masks"] and result["sem_seg"].shape == load_image(str(IMAGE)).shape[:2]
