"""Checkpoints without a configuration.json work wherever a model is accepted: ``pipeline()`` and the command line
give the same segments for a FastInst release file, an EasyCV export and a Hugging Face folder as for a hub-layout
directory holding the same weights."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_oracle, shape_weights, write_native_model_dir
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from PIL import Image
from test_layouts_offline import to_detectron2_names

from modelscope_plugin.apps.cli import main
from modelscope_plugin.builders import build_fastinst, build_mask2former
from modelscope_plugin.config import FastInstConfig, Mask2FormerConfig, ResNetConfig
from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES, COCO_THING_CATEGORIES
from modelscope_plugin.model_dirs.fastinst import write_hub_dir
from modelscope_plugin.model_dirs.load import load_model

IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"


def assert_same_segments(first, second):
    assert len(first["masks"]) == len(second["masks"]) >= 1
    assert first["labels"] == second["labels"] and first["category_ids"] == second["category_ids"]
    assert first["scores"] == pytest.approx(second["scores"], abs=1e-6)
    for mask, other in zip(first["masks"], second["masks"]):
        assert np.array_equal(mask, other)


def segment(model, **parameters):
    return pipeline(Tasks.image_segmentation, model=str(model), device="cpu")(str(IMAGE), **parameters)


def test_fastinst_release_file_in_pipeline_and_cli_equals_its_hub_directory(tmp_path, capsys):
    config = replace(FastInstConfig(), decoder_layers=1, hidden_dim=64, mask_dim=64, feedforward_dim=128, num_heads=8)
    torch.manual_seed(0)
    network = build_fastinst(config).eval()
    release = tmp_path / "fastinst_R50_ppm-fpn_x1_576.pth"
    torch.save({"model": to_detectron2_names(network.state_dict()), "iteration": 368749}, release)
    release_config, _ = load_model(release)
    hub_dir = write_hub_dir(tmp_path / "hub", release_config, network, finetuned=True)  # with its test size
    from_release, from_hub = segment(release, score_thr=0.0), segment(hub_dir, score_thr=0.0)
    assert_same_segments(from_release, from_hub)
    assert set(from_release["labels"]) <= {category.name for category in COCO_THING_CATEGORIES}

    output = tmp_path / "out"
    assert main(["segment", str(IMAGE), "--model", str(release), "--output", str(output), "--quiet",
                 "--score-threshold", "0"]) == 0, capsys.readouterr().err
    document = json.loads((output / f"{IMAGE.stem}.json").read_text())
    assert [segment["label"] for segment in document["segments"]] == from_hub["labels"]


def test_easycv_export_in_pipeline_equals_the_same_weights_in_a_native_directory(tmp_path):
    config = Mask2FormerConfig(backbone=ResNetConfig(depth=50), num_queries=20, hidden_dim=64, num_heads=4,
                               encoder_layers=1, encoder_feedforward_dim=64, decoder_layers=2,
                               decoder_feedforward_dim=64, source="easycv")
    torch.manual_seed(0)
    network = build_mask2former(config).eval()
    shape_weights(network)
    weights = {re.sub(r"^pixel_decoder\.", "head.pixel_decoder.", re.sub(r"^transformer_decoder\.", "head.predictor.", key)):
               value for key, value in network.state_dict().items()}
    easycv_config = {"model": {"type": "Mask2Former", "backbone": {"type": "ResNet", "depth": 50},
                               "head": {"num_things_classes": 80, "num_stuff_classes": 53,
                                        "pixel_decoder": {"conv_dim": 64, "transformer_enc_layers": 1,
                                                          "transformer_dim_feedforward": 64},
                                        "transformer_decoder": {"num_queries": 20, "hidden_dim": 64, "nheads": 4,
                                                                "dec_layers": 2, "dim_feedforward": 64}}}}
    names = [category.name.upper() for category in COCO_PANOPTIC_CATEGORIES]  # names only the export carries
    export = tmp_path / "mask2former_pan_export.pth"
    torch.save({"state_dict": weights, "meta": {"config": easycv_config, "CLASSES": names}}, export)
    export_config, _ = load_model(export)
    native = write_native_model_dir(tmp_path / "native", export_config, network)
    from_export, from_native = segment(export), segment(native)
    assert_same_segments(from_export, from_native)
    assert all(label.isupper() for label in from_export["labels"])


@pytest.mark.oracle
def test_hugging_face_folder_in_pipeline_equals_the_same_weights_in_a_native_directory(tmp_path):
    folder = tmp_path / "hf"
    run_oracle("hf_oracle.py", "make", "--backbone", "swin-tiny-test", "--seed", "0", "--out-dir", folder)
    config, network = load_model(folder)
    native = write_native_model_dir(tmp_path / "native", config, network)
    from_folder, from_native = segment(folder, task="semantic"), segment(native, task="semantic")
    assert_same_segments(from_folder, from_native)
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    assert set(from_folder["labels"]) <= set(id2label.values())
    # the same folder saved as transformers' older pytorch_model.bin
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert_same_segments(segment(folder, task="semantic"), from_native)


def test_a_folder_of_another_hugging_face_model_type_stays_modelscope_s(tmp_path):
    from modelscope_plugin.model_dirs.configuration import synthesized_configuration

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert synthesized_configuration(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mask2former"}))
    assert synthesized_configuration(tmp_path)["pipeline"]["type"] == "mask2former-segmentation"
    Image.new("RGB", (4, 4)).save(tmp_path / "picture.png")
    assert synthesized_configuration(tmp_path / "picture.png") is None
