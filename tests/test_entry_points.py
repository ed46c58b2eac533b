"""Every entry point takes every checkpoint without a configuration.json: a Hugging Face folder, an EasyCV export, a
detectron2 ``model_final_*.pkl`` and a FastInst release ``.pth``. Each source is compared with a hub-layout directory
holding the same weights (``reference``):

- evaluate(): the same metrics; the ground truth is the reference's own semantic map, so both score mIoU 100;
- ``modelscope-seg evaluate``: mIoU 100 on label PNGs of the reference's semantic map;
- ``modelscope-seg segment``: the same segments in the JSON;
- ``modelscope-seg export``: onnxruntime on the exported file answers as the reference's network;
- build_trainer(model=PATH) and ``modelscope-seg train --model PATH``: one step trains, the saved output answers in
  pipeline();
- the browser demo (``serve``): the pipelines build, the page builds, a click gives the reference's segments.

Images are 96 x 128 crops of a COCO photo; models are tiny; test sizes are small where the source records one.
"""
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, run_oracle, shape_weights, tiny_config, write_native_model_dir
from modelscope.pipelines import pipeline
from modelscope.trainers import build_trainer
from modelscope.utils.constant import Tasks
from PIL import Image
from test_detectron2_release import write_detectron2_pkl
from test_layouts_offline import to_detectron2_names

from modelscope_plugin.apps.cli import main
from modelscope_plugin.builders import build_fastinst, build_mask2former
from modelscope_plugin.config import FastInstConfig, Mask2FormerConfig, ResNetConfig
from modelscope_plugin.data.datasets import as_ms_dataset, read_label_folders
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, SyntheticSplit, write_dataset
from modelscope_plugin.evaluation import evaluate
from modelscope_plugin.model_dirs.fastinst import write_hub_dir
from modelscope_plugin.model_dirs.load import load_model

SOURCES = ["hf-folder", "easycv-export", "detectron2-pkl", "fastinst-release"]
ENTRY_POINTS = ["evaluate", "cli-evaluate", "cli-segment", "cli-export", "build-trainer", "cli-train", "serve"]
CATEGORIES = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in SYNTHETIC_CATEGORIES]
SCENES = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)
PHOTO = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"


def make_hf_folder(root: Path) -> Path:
    folder = root / "hf"
    run_oracle("hf_oracle.py", "make", "--backbone", "swin-tiny-test", "--seed", "0", "--out-dir", folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 128, "longest_edge": 160}, "size_divisor": 32,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return folder


def make_easycv_export(root: Path) -> Path:
    config = Mask2FormerConfig(backbone=ResNetConfig(depth=18), num_queries=20, hidden_dim=64, num_heads=4,
                               encoder_layers=1, encoder_feedforward_dim=64, decoder_layers=2,
                               decoder_feedforward_dim=64, source="easycv")
    torch.manual_seed(0)
    network = build_mask2former(config).eval()
    shape_weights(network)
    weights = {re.sub(r"^pixel_decoder\.", "head.pixel_decoder.", re.sub(r"^transformer_decoder\.", "head.predictor.",
                                                                         key)): value
               for key, value in network.state_dict().items()}
    test_pipeline = [{"type": "MMMultiScaleFlipAug", "img_scale": [128, 160], "transforms": [
        {"type": "MMNormalize", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True},
        {"type": "MMPad", "size_divisor": 32}]}]
    easycv_config = {"model": {"type": "Mask2Former", "backbone": {"type": "ResNet", "depth": 18},
                               "head": {"num_things_classes": 80, "num_stuff_classes": 53,
                                        "pixel_decoder": {"conv_dim": 64, "transformer_enc_layers": 1,
                                                          "transformer_dim_feedforward": 64},
                                        "transformer_decoder": {"num_queries": 20, "hidden_dim": 64, "nheads": 4,
                                                                "dec_layers": 2, "dim_feedforward": 64}}},
                     "data": {"val": {"pipeline": test_pipeline}}}
    export = root / "mask2former_pan_export.pth"
    torch.save({"state_dict": weights, "meta": {"config": easycv_config}}, export)
    return export


def make_detectron2_pkl(root: Path) -> Path:
    config = tiny_config()
    torch.manual_seed(0)
    network = build_mask2former(config).eval()
    shape_weights(network)
    return write_detectron2_pkl(root / "model_final_c5c739.pkl", network, config)


def make_fastinst_release(root: Path) -> Path:
    config = replace(FastInstConfig(), decoder_layers=1, hidden_dim=64, mask_dim=64, feedforward_dim=128, num_heads=8)
    torch.manual_seed(0)
    network = build_fastinst(config).eval()
    release = root / "fastinst_R50_ppm-fpn_x1_576.pth"
    torch.save({"model": to_detectron2_names(network.state_dict()), "iteration": 368749}, release)
    return release


MAKERS = {"hf-folder": make_hf_folder, "easycv-export": make_easycv_export, "detectron2-pkl": make_detectron2_pkl,
          "fastinst-release": make_fastinst_release}


class Source:
    """A checkpoint file or folder, the hub-layout directory with its weights, and the reference's answers."""

    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = root
        self.path = MAKERS[name](root)
        self.config, network = load_model(self.path)
        if isinstance(self.config, FastInstConfig):
            self.reference = write_hub_dir(root / "reference", self.config, network, finetuned=True)
        else:
            self.reference = write_native_model_dir(root / "reference", self.config, network)
        self.images = root / "images"
        self.images.mkdir()
        photo = np.asarray(Image.open(PHOTO).convert("RGB"))
        for index, (top, left) in enumerate([(100, 200), (250, 300)]):
            Image.fromarray(photo[top:top + 96, left:left + 128]).save(self.images / f"crop{index}.png")
        self.reference_pipeline = pipeline(Tasks.image_segmentation, model=str(self.reference), device="cpu")
        # label PNGs from the reference's semantic maps: value = class + 1 (0 ignored, as ADE20K's)
        self.labels = root / "labels"
        self.labels.mkdir()
        for image in sorted(self.images.iterdir()):
            semantic = self.reference_pipeline(str(image), task="semantic")["sem_seg"]
            Image.fromarray((np.asarray(semantic) + 1).astype(np.uint8)).save(self.labels / image.name)
        self.rows, problems = read_label_folders(str(self.images), str(self.labels), self.config.num_classes)
        assert not problems and len(self.rows) == 2


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = Source(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, "train", 2, seed=0, config=SCENES)
    write_dataset(root, "val", 1, seed=1, config=SCENES)
    return root


def class_categories(config):
    return [{"id": category_id, "name": name, "isthing": index < config.num_things_classes}
            for index, (category_id, name) in enumerate(zip(config.category_ids, config.class_names))]


def check_evaluate(source: Source, tmp_path: Path, scenes: Path):
    categories = class_categories(source.config)
    from_path = evaluate(str(source.path), source.rows, "semantic", categories=categories, progress=False)
    from_reference = evaluate(str(source.reference), source.rows, "semantic", categories=categories, progress=False)
    assert from_path == from_reference
    assert from_path["mIoU"] == pytest.approx(100.0) and from_path["aAcc"] == pytest.approx(100.0)


def check_cli_evaluate(source: Source, tmp_path: Path, scenes: Path):
    output = tmp_path / "evaluation"
    assert main(["evaluate", "--model", str(source.path), "--task", "semantic", "--images", str(source.images),
                 "--labels", str(source.labels), "--num-classes", str(source.config.num_classes),
                 "--output", str(output), "--quiet"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(100.0) and metrics["aAcc"] == pytest.approx(100.0)


def check_cli_segment(source: Source, tmp_path: Path, scenes: Path):
    image = source.images / "crop0.png"
    task = "instance" if isinstance(source.config, FastInstConfig) else "panoptic"
    assert main(["segment", str(image), "--model", str(source.path), "--output", str(tmp_path / "out"), "--quiet",
                 "--task", task, "--score-threshold", "0"]) == 0
    document = json.loads((tmp_path / "out" / "crop0.json").read_text())
    expected = source.reference_pipeline(str(image), task=task, score_thr=0.0)
    assert [segment["label"] for segment in document["segments"]] == expected["labels"]
    assert [segment["score"] for segment in document["segments"]] == pytest.approx(expected["scores"], abs=1e-6)


def check_cli_export(source: Source, tmp_path: Path, scenes: Path):
    import onnxruntime

    onnx_file = tmp_path / "model.onnx"
    # FastInst picks 100 queries from its stride-16 map: at least 10 x 10 pixels there
    example_size, check_size = ((160, 192), (192, 160)) if isinstance(source.config, FastInstConfig) \
        else ((128, 160), (96, 128))
    assert main(["export", "--model", str(source.path), "--output", str(onnx_file), "--example-size",
                 "{}x{}".format(*example_size), "--check-size", "{}x{}".format(*check_size)]) == 0
    _, reference_network = load_model(source.reference)
    # a dynamic-size graph (FastInst) is compared at its second size, a fixed-size one at its own
    images = torch.randn(1, 3, *(check_size if isinstance(source.config, FastInstConfig) else example_size),
                         generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference_network(images)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    class_logits, mask_logits = session.run(None, {"images": images.numpy()})
    for ours, theirs in ((expected.class_logits, class_logits), (expected.mask_logits, mask_logits)):
        logit_range = max(1.0, float(ours.abs().max()))
        assert float((torch.from_numpy(theirs) - ours).abs().max()) <= 1e-4 * logit_range


TRAIN_OPTIONS = {
    "train.max_epochs": 1, "train.dataloader.batch_size_per_gpu": 2, "train.optimizer.lr": 1e-4,
    "train.loss": {"num_points": 64}, "train.logging": {"interval": 1},
    "train.checkpoint.period": {"interval": 1, "by_epoch": True},
}


def training_size(source: Source) -> int:
    """64 (the scenes' size); 160 for FastInst, whose 100 queries need 10 x 10 pixels of its stride-16 map."""
    return 160 if isinstance(source.config, FastInstConfig) else 64


def training_options(source: Source):
    size = training_size(source)
    options = dict(TRAIN_OPTIONS, **{"train.preprocess": {"short_side": size, "long_side_max": size}})
    if isinstance(source.config, FastInstConfig):
        return dict(options, **{"train.augmentation": {
            "kind": "fastinst", "image_size": size, "short_sides": [size], "long_side_max": size,
            "crop_probability": 0.0, "flip_probability": 0.0}})
    return dict(options, **{"train.augmentation": {"image_size": size, "min_scale": 1.0, "max_scale": 1.0}})


def check_trained_output(work_dir: Path, source: Source):
    output = work_dir / "output"
    result = pipeline(Tasks.image_segmentation, model=str(output), device="cpu")(str(source.images / "crop0.png"),
                                                                                  task="semantic")
    assert result["sem_seg"].shape == (96, 128)
    names = {category["name"] for category in CATEGORIES}
    if isinstance(source.config, FastInstConfig):
        names = {category["name"] for category in CATEGORIES if category["isthing"]}
    assert set(result["labels"]) <= names  # the synthetic classes replaced the checkpoint's head


def check_build_trainer(source: Source, tmp_path: Path, scenes: Path):
    work_dir = tmp_path / "work"
    trainer = build_trainer("mask2former-segmentation", dict(
        model=str(source.path), train_dataset=as_ms_dataset(SyntheticSplit(scenes, "train").panoptic_rows()),
        work_dir=str(work_dir), categories=CATEGORIES, cfg_options=training_options(source), seed=7))
    before = {key: value.clone() for key, value in trainer.unwrap_module(trainer.model).state_dict().items()}
    trainer.train()
    assert trainer.iter == 1
    after = trainer.unwrap_module(trainer.model).state_dict()
    assert any(not torch.equal(before[key], after[key]) for key in before if key.startswith("backbone."))
    check_trained_output(work_dir, source)


def check_cli_train(source: Source, tmp_path: Path, scenes: Path):
    work_dir = tmp_path / "work"
    task = ["--task", "instance"] if isinstance(source.config, FastInstConfig) else []
    assert main(["train", "--data", str(scenes), "--model", str(source.path), "--work-dir", str(work_dir),
                 "--epochs", "1", "--batch-size", "2", "--image-size", str(training_size(source)), "--num-points", "64",
                 "--workers", "0",
                 *task]) == 0
    assert (work_dir / "metrics.json").is_file()
    check_trained_output(work_dir, source)


def check_serve(source: Source, tmp_path: Path, scenes: Path):
    pytest.importorskip("gradio")
    from modelscope_plugin.apps import browser_demo

    pipelines = browser_demo.load_pipelines([str(source.path)], device="cpu")
    browser_demo.build_app(pipelines, output_folder=tmp_path)
    inference = source.config.inference
    task = "instance" if isinstance(source.config, FastInstConfig) else "panoptic"
    image = source.images / "crop1.png"
    _, table, document, _, _ = browser_demo.segment_upload(
        pipelines, tmp_path, {"path": str(image)}, str(source.path), task, inference.object_mask_threshold,
        inference.overlap_threshold, inference.filter_low_score, 0.0, inference.max_per_image)
    expected = source.reference_pipeline(str(image), task=task, score_thr=0.0)
    assert [row[1] for row in table] == expected["labels"]
    assert [segment["label"] for segment in document["segments"]] == expected["labels"]


CHECKS = {"evaluate": check_evaluate, "cli-evaluate": check_cli_evaluate, "cli-segment": check_cli_segment,
          "cli-export": check_cli_export, "build-trainer": check_build_trainer, "cli-train": check_cli_train,
          "serve": check_serve}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("source_name", [pytest.param(name, marks=pytest.mark.oracle) if name == "hf-folder"
                                         else name for name in SOURCES])
def test_entry_point_takes_the_checkpoint_as_its_hub_layout_directory(sources, scenes, tmp_path, source_name,
                                                                       entry_point):
    CHECKS[entry_point](sources(source_name), tmp_path, scenes)
