"""The r50 card's finetuning recipe, ``build_trainer('easycv', ...)`` over ``MsDataset.load``'s archive datasets,
after ``import modelscope_plugin``: EasyCV-written configuration sections, the hub-archive dataset, lr policies.

The model directory is the r50 card's hub layout (random weights, EasyCV key names, one ``*.pt``) with the training
sections EasyCV's ``to_ms_config`` writes for ``mask2former_r50_8xb2_e50_panoptic.py``, at a tiny input size. The
datasets are built as ``TaskSpecificDatasetBuilder.as_dataset`` builds them for a hub dataset shipped as an archive:
an ``ExternalDataset`` whose ``split_config`` names the extracted folder.
"""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shape_weights
from modelscope.msdatasets import MsDataset
from modelscope.msdatasets.download.dataset_builder import TaskSpecificDatasetBuilder
from modelscope.trainers import build_trainer
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.trainer import EpochBasedTrainer
from modelscope.utils.constant import ModeKeys
from test_cards import easycv_configuration
from test_layouts_offline import small_resnet_config

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.data.categories import MMDET_COCO_PANOPTIC_CLASSES
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, write_dataset
from modelscope_plugin.errors import TrainingConfigError, TrainingDataError
from modelscope_plugin.integration import hub
from modelscope_plugin.integration.datasets import CocoPanopticDetDataset, replace_data_root
from modelscope_plugin.integration.easycv_recipe import read_easycv_recipe
from modelscope_plugin.training.lr_policy import PolicyLR, lr_policy_from

MODEL_ID = "damo/cv_r50_panoptic-segmentation_cocopan"
SCENES = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)
NORMALIZE = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True}


def tuple_of(*values):
    return {"__class__": "tuple", "__value__": list(values)}  # EasyCV's to_ms_config encoding


def data_source(split: str, training: bool) -> dict:
    """``DetSourceCocoPanoptic`` of the synthetic layout's ``split`` under the extracted folder."""
    return {"type": "DetSourceCocoPanoptic",
            "pan_ann_file": f"${{data_root}}/annotations/panoptic_{split}.json",
            "ann_file": f"${{data_root}}/annotations/instances_{split}.json",
            "img_prefix": f"${{data_root}}/{split}/", "seg_prefix": f"${{data_root}}/annotations/panoptic_{split}/",
            "pipeline": [{"type": "LoadImageFromFile", "to_float32": True},
                         {"type": "LoadPanopticAnnotations", "with_bbox": True, "with_mask": True, "with_seg": True}],
            "thing_classes": list(MMDET_COCO_PANOPTIC_CLASSES[:80]),
            "stuff_classes": list(MMDET_COCO_PANOPTIC_CLASSES[80:]),
            **({"filter_empty_gt": True, "iscrowd": False} if training else {"test_mode": True, "iscrowd": True})}


def recipe_configuration(config, image_size: int = 64) -> dict:
    """The r50 card's configuration.json as EasyCV's ``to_ms_config`` writes it from
    ``mask2former_r50_8xb2_e50_panoptic.py``, the network and the input size shrunk (``image_size``, 256 points)."""
    card = easycv_configuration(config)
    card["model"]["train_cfg"] = {"class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0, "deep_supervision": True,
                                  "dec_layers": config.decoder_layers + 1, "num_points": 256, "no_object_weight": 0.1,
                                  "oversample_ratio": 3.0, "importance_sample_ratio": 0.75}
    card["model"]["pretrained"] = True
    card["model"]["__easycv_arch__"] = {"type": "Mask2Former"}
    square = tuple_of(image_size, image_size)
    card["dataset"] = {
        "train": {"type": "DetDataset", "data_source": data_source("train", True), "pipeline": [
            {"type": "MMRandomFlip", "flip_ratio": 0.5},
            {"type": "MMResize", "img_scale": square, "ratio_range": tuple_of(0.5, 1.5), "multiscale_mode": "range",
             "keep_ratio": True},
            {"type": "MMRandomCrop", "crop_size": square, "crop_type": "absolute", "recompute_bbox": True,
             "allow_negative_crop": True},
            {"type": "MMNormalize", **NORMALIZE}, {"type": "MMPad", "size": square},
            {"type": "DefaultFormatBundle"},
            {"type": "Collect", "keys": ["img", "gt_bboxes", "gt_labels", "gt_masks", "gt_semantic_seg"]}]},
        "val": {"type": "DetDataset", "data_source": data_source("val", False), "pipeline": [
            {"type": "MMMultiScaleFlipAug", "img_scale": tuple_of(96, image_size), "flip": False, "transforms": [
                {"type": "MMResize", "keep_ratio": True}, {"type": "MMRandomFlip"},
                {"type": "MMNormalize", **NORMALIZE},
                {"type": "MMPad", "size_divisor": 32}, {"type": "ImageToTensor", "keys": ["img"]},
                {"type": "Collect", "keys": ["img"]}]}]}}
    card["train"] = {
        "work_dir": None, "max_epochs": 50, "dataloader": {"batch_size_per_gpu": 2, "workers_per_gpu": 2},
        "optimizer": {"type": "AdamW", "lr": 0.0001, "weight_decay": 0.05, "eps": 1e-8, "betas": tuple_of(0.9, 0.999),
                      "paramwise_options": {"backbone": {"lr_mult": 0.1}, "query_embed": {"weight_decay": 0.0},
                                            "query_feat": {"weight_decay": 0.0}, "level_embed": {"weight_decay": 0.0},
                                            "norm": {"weight_decay": 0.0}},
                      "options": {"grad_clip": {"max_norm": 0.01, "norm_type": 2}}},
        "lr_scheduler": {"policy": "step", "gamma": 0.1, "by_epoch": False, "step": [327778, 355092],
                         "warmup": "linear", "warmup_by_epoch": False, "warmup_ratio": 1.0, "warmup_iters": 10},
        "hooks": [{"type": "CheckpointHook", "interval": 1}, {"type": "EvaluationHook", "interval": 1},
                  {"type": "AddLrLogHook"}, {"type": "IterTimerHook"}, {"type": "TextLoggerHook", "interval": 50}]}
    card["evaluation"] = {
        "dataloader": {"batch_size_per_gpu": 1, "workers_per_gpu": 2},
        "metrics": {"type": "EasyCVMetric", "evaluators": [
            {"type": "CocoPanopticEvaluator", "classes": list(MMDET_COCO_PANOPTIC_CLASSES)},
            {"type": "CocoDetectionEvaluator", "classes": list(MMDET_COCO_PANOPTIC_CLASSES[:80])},
            {"type": "CocoMaskEvaluator", "classes": list(MMDET_COCO_PANOPTIC_CLASSES[:80])}]}}
    card["CLASSES"] = list(MMDET_COCO_PANOPTIC_CLASSES)
    card["PALETTE"] = [[(index * 37) % 256, (index * 91) % 256, (index * 53) % 256] for index in range(133)]
    card["__easycv_meta__"] = {"reserved_keys": ["CLASSES", "PALETTE"]}
    return card


def write_r50_hub_dir(directory: Path, configuration: dict) -> Path:
    """Random weights in the r50 card's published layout (EasyCV names, ``state_dict`` + ``meta``, one ``*.pt``)."""
    torch.manual_seed(0)
    network = build_mask2former(small_resnet_config()).eval()
    shape_weights(network)
    directory.mkdir(parents=True)
    state_dict = {re.sub(r"^pixel_decoder\.", "head.pixel_decoder.",
                         re.sub(r"^transformer_decoder\.", "head.predictor.", key)): value
                  for key, value in network.state_dict().items()}
    torch.save({"state_dict": state_dict, "meta": {"easycv_version": "0.11.7"}}, directory / "epoch_50.pt")
    (directory / "configuration.json").write_text(json.dumps(configuration))
    return directory


def archive_dataset(folder, split: str, **meta_arguments) -> MsDataset:
    """What ``MsDataset.load(name, namespace=..., split=split)`` returns for a hub dataset shipped as an archive
    extracted to ``folder``: ``TaskSpecificDatasetBuilder.as_dataset`` over its download result."""
    builder = TaskSpecificDatasetBuilder.__new__(TaskSpecificDatasetBuilder)
    builder.split_path_dict = {split: str(folder)}  # DataDownloadManager.download_and_extract's result
    builder._config_kwargs = dict(meta_arguments)  # the dataset's meta arguments and MsDataset.load's config_kwargs
    return MsDataset.to_ms_dataset(builder.as_dataset())


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """(MODELSCOPE_CACHE holding the r50 id, its model directory, the extracted dataset folder)."""
    root = tmp_path_factory.mktemp("easycv_recipe")
    cache = root / "cache"
    model_dir = write_r50_hub_dir(cache / "models" / MODEL_ID.replace("/", "--") / "snapshots" / "master",
                                  recipe_configuration(small_resnet_config()))
    data = root / "COCO2017_panopic_subset"
    write_dataset(data, "train", 4, seed=0, config=SCENES)
    write_dataset(data, "val", 2, seed=1, config=SCENES)
    return cache, model_dir, data


@pytest.fixture
def hub_cache(recipe, monkeypatch):
    cache, _, _ = recipe
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    hub.resolve_model_dir.cache_clear()
    yield cache
    hub.resolve_model_dir.cache_clear()


def no_pip(monkeypatch):
    """ModelScope runs pip as a subprocess for the r50 card's plugins: ["pai-easycv"]; any such run fails the test."""
    def refusing_pip(original):
        def run(*arguments, **kwargs):
            command = arguments[0] if arguments else kwargs.get("args")
            if "pip" in " ".join(map(str, command if isinstance(command, (list, tuple)) else [command])):
                raise AssertionError(f"pip was started: {command}")
            return original(*arguments, **kwargs)

        return run

    for name in ("run", "Popen", "check_call", "check_output", "call"):
        monkeypatch.setattr(subprocess, name, refusing_pip(getattr(subprocess, name)))


def group_of(optimizer, parameter):
    return next(group for group in optimizer.param_groups if any(p is parameter for p in group["params"]))


def test_the_card_recipe_trains_two_epochs_and_its_output_runs_in_the_pipeline(recipe, hub_cache, tmp_path,
                                                                              monkeypatch, caplog):
    _, _, data = recipe
    caplog.set_level("INFO")
    no_pip(monkeypatch)
    work_dir = tmp_path / "work"
    kwargs = dict(model=MODEL_ID, train_dataset=archive_dataset(data, "train", big_data=True),
                  eval_dataset=archive_dataset(data, "validation", big_data=True),
                  work_dir=str(work_dir), cfg_options={"train.max_epochs": 2})
    from modelscope.metainfo import Trainers

    trainer = build_trainer(Trainers.easycv, kwargs)  # the card's spelling; ModelScope 1.40.2 has no such constant
    monkeypatch.undo()
    assert Trainers.easycv == "easycv" and type(trainer).__name__ == "EasyCVRecipeTrainer"
    # the annotation file's categories decide; the card's 133 COCO names differ and that is logged
    assert [c.name for c in trainer.categories] == [c.name for c in SYNTHETIC_CATEGORIES if c.isthing] + \
        [c.name for c in SYNTHETIC_CATEGORIES if not c.isthing]
    assert "133 classes -> 7" in caplog.text
    assert "thing_classes / stuff_classes (80 + 53 names) differ from the annotation file's categories" in caplog.text
    assert "AddLrLogHook: ignored" in caplog.text
    assert "CocoPanopticEvaluator classes (133 names) differ from the training categories (7" in caplog.text
    assert "CocoMaskEvaluator classes (80 names) differ from the training categories (4" in caplog.text
    # model.train_cfg reaches the criterion and its matcher
    criterion = trainer.criterion
    assert (criterion.num_points, criterion.oversample_ratio, criterion.importance_sample_ratio) == (256, 3.0, 0.75)
    assert criterion.weights == {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    assert criterion.matcher.num_points == 256
    trainer.train()
    assert trainer.iter == 4 and trainer.epoch == 2  # 4 images, batches of 2, two epochs
    # what ModelScope's test of this recipe checked: one json log and the last epoch's checkpoint
    files = sorted(path.name for path in work_dir.iterdir())
    assert len([name for name in files if name.endswith(".log.json")]) == 1, files
    assert "epoch_2.pth" in files, files
    log = [json.loads(line) for line in next(work_dir.glob("*.log.json")).read_text().splitlines() if line.strip()]
    evaluations = [entry for entry in log if entry.get("mode") == "eval"]  # EvaluationHook, interval 1 epoch
    scores = {"evaluation/PQ", "evaluation/bbox/AP", "evaluation/segm/AP"}  # the card's three evaluators
    assert [entry["epoch"] for entry in evaluations] == [1, 2] and all(scores <= set(entry) for entry in evaluations)
    # the card's parameter groups (EasyCV's names: backbone.*, head.pixel_decoder.*, head.predictor.*)
    network = trainer.unwrap_module(trainer.model)
    optimizer = trainer.optimizer
    backbone_weight = group_of(optimizer, network.backbone.layer1[0].conv1.weight)
    assert backbone_weight["initial_lr"] == 1e-4 * 0.1 and backbone_weight["weight_decay"] == 0.05
    query_embed = group_of(optimizer, network.transformer_decoder.query_embed.weight)
    assert query_embed["initial_lr"] == 1e-4 and query_embed["weight_decay"] == 0.0
    level_embed = group_of(optimizer, network.pixel_decoder.transformer.level_embed)
    assert level_embed["weight_decay"] == 0.0
    decoder_norm = group_of(optimizer, network.transformer_decoder.decoder_norm.weight)
    assert decoder_norm["initial_lr"] == 1e-4 and decoder_norm["weight_decay"] == 0.0
    class_embed = group_of(optimizer, network.transformer_decoder.class_embed.weight)
    assert class_embed["initial_lr"] == 1e-4 and class_embed["weight_decay"] == 0.05
    assert all(not p.requires_grad for p in network.backbone.bn1.parameters())  # frozen: in no group
    assert all(p is not network.backbone.bn1.weight for group in optimizer.param_groups for p in group["params"])
    assert isinstance(trainer.lr_scheduler, PolicyLR) and trainer.lr_scheduler.config.policy == "step"
    hooks = {type(hook).__name__ for hook in trainer.hooks}
    assert {"SegmentationCheckpointHook", "EvaluationHook", "IterTimerHook", "TextLoggerHook", "LrSchedulerHook",
            "OptimizerHook"} <= hooks
    optimizer_hook = next(hook for hook in trainer.hooks if type(hook).__name__ == "OptimizerHook")
    assert optimizer_hook.grad_clip == {"max_norm": 0.01, "norm_type": 2}
    # the output directory loads in ModelScope's pipeline with the dataset's classes
    from modelscope.pipelines import pipeline

    segmenter = pipeline("image-segmentation", model=str(work_dir / "output"), device="cpu")
    result = segmenter(str(data / "val" / "000001.png"))
    assert result["panoptic_seg"].shape == (64, 64)
    assert set(result["labels"]) <= {c.name for c in SYNTHETIC_CATEGORIES}
    trained = network.state_dict()
    assert all(torch.equal(trained[key], value) for key, value in segmenter.model.network.state_dict().items())


def test_lr_policies_give_mmcv_values_at_given_iterations():
    """mmcv's LrUpdaterHook, written out: regular lr of progress p of P, then warmup for i < warmup_iters:
    step: base * gamma ** (milestones <= p); poly: (base - min_lr) * (1 - p / P) ** power + min_lr;
    cosine: target + (base - target) * (cos(pi * p / P) + 1) / 2; linear warmup: regular * (1 - (1 - i / w) * (1 - r));
    constant: regular * r; exp: regular * r ** (1 - i / w)."""
    def lrs(policy: dict, iterations_per_epoch: int, max_epochs: int, iterations: int):
        weight = torch.nn.Parameter(torch.zeros(1))
        bias = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([{"params": [weight], "lr": 0.01}, {"params": [bias], "lr": 0.001}], lr=0.01)
        scheduler = PolicyLR(optimizer, lr_policy_from(policy), iterations_per_epoch, max_epochs)
        values = []
        for _ in range(iterations):
            values.append([group["lr"] for group in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
        return values

    step = lrs({"policy": "step", "by_epoch": False, "step": [4, 7], "gamma": 0.1, "warmup": "linear",
                "warmup_iters": 3, "warmup_ratio": 0.25}, iterations_per_epoch=5, max_epochs=2, iterations=9)
    expected = [0.0025, 0.005, 0.0075, 0.01, 0.001, 0.001, 0.001, 0.0001, 0.0001]  # 1 - (1 - i/3) * 0.75 for i < 3
    assert [value[0] for value in step] == pytest.approx(expected, rel=1e-12, abs=0)
    assert [value[1] for value in step] == pytest.approx([value / 10 for value in expected], rel=1e-12, abs=0)

    poly = lrs({"policy": "poly", "by_epoch": False, "power": 0.9, "min_lr": 1e-4, "warmup": "constant",
                "warmup_iters": 2, "warmup_ratio": 0.1}, iterations_per_epoch=5, max_epochs=2, iterations=10)
    assert poly[0][0] == pytest.approx(0.01 * 0.1, rel=1e-12, abs=0)
    assert poly[1][0] == pytest.approx(((0.01 - 1e-4) * (1 - 1 / 10) ** 0.9 + 1e-4) * 0.1, rel=1e-12, abs=0)
    assert poly[5][0] == pytest.approx((0.01 - 1e-4) * (1 - 5 / 10) ** 0.9 + 1e-4, rel=1e-12, abs=0)
    assert poly[5][0] == pytest.approx(0.00540528, rel=1e-6, abs=0)  # 0.0099 * 0.5 ** 0.9 + 1e-4
    assert poly[9][1] == pytest.approx((0.001 - 1e-4) * (1 - 9 / 10) ** 0.9 + 1e-4, rel=1e-12, abs=0)

    # by epoch: the regular lr changes at epoch boundaries; warmup of 1 epoch = 4 iterations, per iteration
    cosine = lrs({"policy": "CosineAnnealing", "by_epoch": True, "min_lr_ratio": 0.01, "warmup": "exp",
                  "warmup_iters": 1, "warmup_by_epoch": True, "warmup_ratio": 0.1},
                 iterations_per_epoch=4, max_epochs=3, iterations=12)
    assert cosine[0][0] == pytest.approx(0.01 * 0.1 ** (1 - 0 / 4), rel=1e-12, abs=0)
    assert cosine[2][0] == pytest.approx(0.01 * 0.1 ** (1 - 2 / 4), rel=1e-12, abs=0)
    assert cosine[4][0] == pytest.approx(1e-4 + (0.01 - 1e-4) * (math.cos(math.pi * 1 / 3) + 1) / 2, rel=1e-12, abs=0)
    assert cosine[4][0] == pytest.approx(0.007525, rel=1e-12, abs=0) and cosine[7][0] == cosine[4][0]
    assert cosine[9][0] == pytest.approx(0.002575, rel=1e-12, abs=0)  # epoch 2: cos(2 pi / 3) = -1/2
    assert cosine[9][1] == pytest.approx(1e-5 + (0.001 - 1e-5) * 0.25, rel=1e-12, abs=0)


def test_lr_policy_problems_are_named_together():
    with pytest.raises(TrainingConfigError) as caught:
        lr_policy_from({"policy": "cyclic", "warmup": "linear", "warmup_iters": 0, "power_": 2})
    message = str(caught.value)
    assert "unknown keys ['power_']" in message and "policy 'cyclic'" in message and "warmup_iters" in message


def test_unknown_easycv_keys_fail_when_the_trainer_is_built(recipe, tmp_path):
    _, model_dir, data = recipe
    configuration = recipe_configuration(small_resnet_config())
    configuration["train"]["optimizer"]["paramwise_options"]["backbone"] = {"lr_mul": 0.1}
    configuration["train"]["hooks"].append({"type": "YOLOXModeSwitchHook", "num_last_epochs": 15})
    configuration["train"]["lr_scheduler"]["warmup"] = "cosine"
    configuration["dataset"]["train"]["pipeline"].insert(0, {"type": "MMPhotoMetricDistortion"})
    configuration["dataset"]["train"]["data_source"]["classes_file"] = "classes.txt"
    configuration["evaluation"]["metrics"]["evaluators"].append({"type": "SegmentationEvaluator"})
    configuration["model"]["train_cfg"]["cost_class"] = 1.0
    configuration["train"]["optimizer"]["momentum"] = 0.9
    bad_dir = tmp_path / "model"
    bad_dir.mkdir()
    for path in model_dir.iterdir():
        (bad_dir / path.name).symlink_to(path)
    (bad_dir / "configuration.json").unlink()
    (bad_dir / "configuration.json").write_text(json.dumps(configuration))
    with pytest.raises(TrainingConfigError) as caught:
        build_trainer("easycv", dict(model=str(bad_dir), train_dataset=archive_dataset(data, "train"),
                                     work_dir=str(tmp_path / "work")))
    message = str(caught.value)
    for named in ("'backbone': unknown options ['lr_mul']", "'YOLOXModeSwitchHook'", "warmup 'cosine'",
                  "'MMPhotoMetricDistortion'", "unknown keys ['classes_file']", "'SegmentationEvaluator'",
                  "model.train_cfg: unknown keys ['cost_class']", "train.optimizer (AdamW): unknown keys ['momentum']"):
        assert named in message, named
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").glob("*.pth"))


def test_a_dataset_error_in_build_dataset_surfaces(recipe, hub_cache, tmp_path, capsys, monkeypatch):
    _, _, data = recipe
    from modelscope.msdatasets.dataset_cls.custom_datasets.builder import CUSTOM_DATASETS

    class EasyCVDetDataset:  # what pai-easycv registers under the same group and name
        def __init__(self, **kwargs):
            raise AssertionError("EasyCV's DetDataset was built for this package's model type")

    monkeypatch.setitem(CUSTOM_DATASETS.modules.setdefault("image-segmentation", {}), "DetDataset", EasyCVDetDataset)
    empty = tmp_path / "extracted"
    empty.mkdir()  # an archive without the annotation files the configuration names
    kwargs = dict(model=MODEL_ID, train_dataset=archive_dataset(data, "train"),
                  eval_dataset=archive_dataset(empty, "validation"), work_dir=str(tmp_path / "work"))
    with pytest.raises(TrainingDataError) as caught:
        build_trainer("easycv", kwargs)
    assert f"dataset.val.data_source.pan_ann_file: file {empty}/annotations/panoptic_val.json does not exist" \
        in str(caught.value)
    # the card's EvaluationHook needs an eval_dataset: said when the trainer is built, not after the first epoch
    with pytest.raises(TrainingConfigError, match="EvaluationHook is configured .* but there is no eval_dataset"):
        build_trainer("easycv", dict(kwargs, eval_dataset=None))
    # ModelScope's own build_dataset would have printed the dataset error and gone on with the raw MsDataset
    trainer = build_trainer("easycv", dict(kwargs, eval_dataset=archive_dataset(data, "validation")))
    # paramwise_options patterns see EasyCV's names
    assert trainer.parameter_name("transformer_decoder.class_embed.weight") == "head.predictor.class_embed.weight"
    raw = archive_dataset(empty, "validation")
    assert EpochBasedTrainer.build_dataset(trainer, raw, trainer.cfg, ModeKeys.EVAL) is raw
    assert "build_dataset error log" in capsys.readouterr().out
    # and on a good archive it builds this package's dataset unchanged, through to_custom_dataset
    built = EpochBasedTrainer.build_dataset(trainer, archive_dataset(data, "validation"), trainer.cfg, ModeKeys.EVAL)
    assert isinstance(built, CocoPanopticDetDataset) and len(built) == 2


def test_data_root_resolves_to_the_extracted_folder(recipe, tmp_path):
    _, _, data = recipe
    section = {"type": "mask2former-coco-panoptic-dataset", "data_source": data_source("train", True),
               "pipeline": []}
    from modelscope.utils.config import Config

    configuration = Config({"task": "image-segmentation", "model": {"type": "r50-panoptic-segmentation"},
                            "dataset": {"train": section}})
    dataset = archive_dataset(f"{data}/", "train", big_data=True)  # a trailing separator is dropped
    dataset.to_custom_dataset(custom_cfg=configuration, mode=ModeKeys.TRAIN)
    built = dataset.ds_instance
    assert isinstance(built, CocoPanopticDetDataset)
    assert built.source.pan_ann_file == f"{data}/annotations/panoptic_train.json"
    assert built.source.img_prefix == f"{data}/train/"
    assert built.instances_file == f"{data}/annotations/instances_train.json"
    assert sorted(Path(row["image_path"]).name for row in built) == ["000001.png", "000002.png", "000003.png",
                                                                     "000004.png"]
    assert all(row["panoptic_path"].startswith(f"{data}/annotations/panoptic_train/") for row in built)
    assert "hub dataset arguments not used: ['big_data']" in " ".join(built.notes)
    assert replace_data_root({"a": ["${data_root}/x", 3], "b": {"c": "${data_root}"}}, "/d") == \
        {"a": ["/d/x", 3], "b": {"c": "/d"}}
    unresolved = r"\['ann_file', 'img_prefix', 'pan_ann_file', 'seg_prefix'\] hold \$\{data_root\}"
    with pytest.raises(TrainingConfigError, match=unresolved):
        CocoPanopticDetDataset(mode=ModeKeys.TRAIN, data_source=data_source("train", True))


def test_the_recipe_table_maps_the_card_sections():
    recipe = read_easycv_recipe(recipe_configuration(small_resnet_config(), image_size=128))
    assert recipe.train["augmentation"] == {"kind": "large_scale_jitter", "image_size": 128, "min_scale": 0.5,
                                            "max_scale": 1.5, "flip_probability": 0.5}
    assert recipe.train["loss"] == {"class_weight": 2.0, "mask_weight": 5.0, "dice_weight": 5.0, "num_points": 256,
                                    "no_object_weight": 0.1, "oversample_ratio": 3.0, "importance_sample_ratio": 0.75}
    assert [hook["type"] for hook in recipe.train["hooks"]] == ["CheckpointHook", "EvaluationHook", "IterTimerHook",
                                                                "TextLoggerHook"]
    assert recipe.evaluation["metrics"] == [{"type": "segmentation-panoptic-quality"},
                                            {"type": "segmentation-coco-instance-ap", "iou_types": ["bbox"]},
                                            {"type": "segmentation-coco-instance-ap", "iou_types": ["segm"]}]
    assert recipe.datasets["train"]["type"] == recipe.datasets["val"]["type"] == "mask2former-coco-panoptic-dataset"
    assert recipe.decoder_stages == 3
    assert any("evaluation.dataloader: ignored" in note for note in recipe.notes)


def test_pai_easycv_is_dropped_for_this_package_model_types_only(tmp_path, monkeypatch):
    import modelscope.trainers.builder as trainer_builder

    other = tmp_path / "other"
    other.mkdir()
    (other / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "plugins": ["pai-easycv", "modelscope-plugin-seg"],
        "model": {"type": "segformer"}, "pipeline": {"type": "easycv-segmentation"}}))
    assert list(trainer_builder.read_config(str(other)).plugins) == ["pai-easycv"]
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "plugins": ["pai-easycv"],
        "model": {"type": "r50-panoptic-segmentation"}, "pipeline": {"type": "image-panoptic-segmentation-easycv"}}))
    assert list(trainer_builder.read_config(str(ours)).plugins) == []
    import modelscope.models.base.base_model as base_model

    assert "r50-panoptic-segmentation" in base_model._CONFIG_ONLY_MODELS  # Model.from_pretrained ignores its plugins


def test_the_easycv_name_goes_to_easycv_for_other_model_types(tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "configuration.json").write_text(json.dumps({
        "framework": "pytorch", "task": "image-segmentation", "model": {"type": "segformer"},
        "pipeline": {"type": "easycv-segmentation"}}))
    with pytest.raises(TrainingConfigError, match="model type 'segformer'.*pai-easycv"):
        build_trainer("easycv", dict(model=str(other), work_dir=str(tmp_path / "work")))
    # where pai-easycv is installed: its trainer, whose module registers the same name when imported
    package = tmp_path / "site" / "easycv" / "toolkit" / "modelscope" / "trainers"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent, package.parent.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "trainer.py").write_text(
        "from modelscope.trainers.builder import TRAINERS\n"
        "@TRAINERS.register_module(module_name='easycv')\n"
        "class EasyCVEpochBasedTrainer:\n"
        "    def __init__(self, model=None, **kwargs):\n"
        "        self.model = model\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in [name for name in sys.modules if name == "easycv" or name.startswith("easycv.")]:
        monkeypatch.delitem(sys.modules, name)
    trainer = build_trainer("easycv", dict(model=str(other), work_dir=str(tmp_path / "work")))
    assert type(trainer).__name__ == "EasyCVEpochBasedTrainer" and trainer.model == str(other)
    from modelscope.trainers.builder import TRAINERS

    from modelscope_plugin.integration.easycv_trainer import build_easycv_trainer

    assert TRAINERS.get("easycv") is build_easycv_trainer  # this package's entry keeps the name
    for name in [name for name in sys.modules if name == "easycv" or name.startswith("easycv.")]:
        del sys.modules[name]  # the stand-in package; monkeypatch puts back any real one


def test_the_segmentation_trainer_reads_archive_datasets_and_an_lr_policy(recipe, tiny_model_dir, tmp_path):
    """``mask2former-segmentation`` on a native model directory: archive datasets through a dataset section of this
    package's type, and an EasyCV lr policy that no default scheduler key joins."""
    _, _, data = recipe
    learning_rates = []

    class LrRecorder(Hook):
        def before_train_iter(self, trainer):
            learning_rates.append(trainer.optimizer.param_groups[0]["lr"])

    sections = {split: {"type": "mask2former-coco-panoptic-dataset",
                        "data_source": data_source(split, split == "train")} for split in ("train", "val")}
    trainer = build_trainer("mask2former-segmentation", dict(
        model=str(tiny_model_dir), train_dataset=archive_dataset(data, "train"),
        eval_dataset=archive_dataset(data, "validation"), work_dir=str(tmp_path / "work"), callbacks=[LrRecorder()],
        cfg_options={"dataset": sections, "train.max_epochs": 1, "train.optimizer.lr": 1e-3,
                     "train.lr_scheduler": {"policy": "step", "step": [1], "gamma": 0.5, "by_epoch": False},
                     "train.augmentation": {"image_size": 64}, "train.preprocess": {"short_side": 64,
                                                                                     "long_side_max": 64},
                     "train.loss": {"num_points": 256}}))
    assert [c.id for c in trainer.categories] == [c.id for c in SYNTHETIC_CATEGORIES if c.isthing] + \
        [c.id for c in SYNTHETIC_CATEGORIES if not c.isthing]
    trainer.train()
    assert learning_rates == [1e-3, 1e-3 * 0.5]  # 4 images, batches of 2: iterations 0 and 1 (milestone 1)
    values = trainer.evaluate()
    assert {"PQ", "PQ_th", "PQ_st"} <= set(values) and values["n"] >= 4


def test_filter_empty_gt_leaves_out_images_without_a_thing_in_training_only(recipe, tmp_path):
    _, _, data = recipe
    annotations = json.loads((data / "annotations" / "panoptic_train.json").read_text())
    thing_ids = {c["id"] for c in annotations["categories"] if c["isthing"]}
    emptied = annotations["annotations"][0]
    emptied["segments_info"] = [s for s in emptied["segments_info"] if s["category_id"] not in thing_ids]
    (tmp_path / "panoptic_train.json").write_text(json.dumps(annotations))
    source = dict(data_source("train", True), pan_ann_file=str(tmp_path / "panoptic_train.json"))
    source = replace_data_root(source, str(data))
    training = CocoPanopticDetDataset(mode=ModeKeys.TRAIN, data_source=source)
    assert len(training) == 3 and emptied["image_id"] not in {row["image_id"] for row in training}
    assert "filter_empty_gt left out 1 images without a thing" in " ".join(training.notes)
    assert len(CocoPanopticDetDataset(mode=ModeKeys.EVAL, data_source=dict(source, test_mode=True))) == 4


def test_paramwise_patterns_match_easycv_names_and_later_patterns_override():
    from modelscope_plugin.integration.easycv_trainer import easycv_parameter_name
    from modelscope_plugin.training.optimizer import parameter_groups_by_name, parameter_rules_from

    network = build_mask2former(small_resnet_config())
    rules = parameter_rules_from({"backbone": {"lr_mult": 0.1}, r"backbone\.layer4\.": {"lr": 0.5},
                                  r"^head\.predictor\.class_embed\.": {"lr_mult": 10.0, "decay_mult": 0.5},
                                  "norm": {"weight_decay": 0.0}})
    groups = parameter_groups_by_name(network, 1e-4, 0.05, rules, easycv_parameter_name)
    setting = {name: (group["lr"], group["weight_decay"]) for group in groups for name in group["names"]}
    assert setting["backbone.layer3.0.conv1.weight"] == (1e-4 * 0.1, 0.05)
    assert setting["backbone.layer4.0.conv1.weight"] == (0.5, 0.05)  # the later pattern sets lr again
    assert setting["transformer_decoder.class_embed.weight"] == (1e-4 * 10.0, 0.05 * 0.5)  # EasyCV's name matched
    assert setting["transformer_decoder.decoder_norm.weight"] == (1e-4, 0.0)
    assert setting["pixel_decoder.input_proj.0.1.weight"] == (1e-4, 0.05)  # a GroupNorm whose name has no "norm"
    assert groups[0]["lr"] == 1e-4 and groups[0]["weight_decay"] == 0.05  # the base group first (the logged lr)
    # matched against this package's own names, the head pattern would match nothing
    plain = parameter_groups_by_name(network, 1e-4, 0.05, rules)
    plain_setting = {name: (group["lr"], group["weight_decay"]) for group in plain for name in group["names"]}
    assert plain_setting["transformer_decoder.class_embed.weight"] == (1e-4, 0.05)


def test_an_lr_policy_resumes_at_the_iteration_it_stopped(recipe, tiny_model_dir, tmp_path):
    """Linear warmup over 3 iterations, then a step at iteration 3: a run resumed from its epoch-1 checkpoint sets
    the learning rates of iterations 2 and 3 as the uninterrupted run does. (The epoch-1 checkpoint comes from
    ModelScope's default CheckpointHook of a trainer that is not the process's first.)"""
    _, _, data = recipe

    def run(work_dir, max_epochs, checkpoint=None):
        learning_rates = {}

        class LrRecorder(Hook):
            def before_train_iter(self, trainer):
                learning_rates[trainer.iter] = trainer.optimizer.param_groups[0]["lr"]

        sections = {"train": {"type": "mask2former-coco-panoptic-dataset", "data_source": data_source("train", True)}}
        trainer = build_trainer("mask2former-segmentation", dict(
            model=str(tiny_model_dir), train_dataset=archive_dataset(data, "train"), work_dir=str(work_dir),
            callbacks=[LrRecorder()],
            cfg_options={"dataset": sections, "train.max_epochs": max_epochs, "train.optimizer.lr": 1e-3,
                         "train.lr_scheduler": {"policy": "step", "step": [3], "gamma": 0.1, "by_epoch": False,
                                                "warmup": "linear", "warmup_iters": 3, "warmup_ratio": 0.1},
                         "train.augmentation": {"image_size": 64}, "train.loss": {"num_points": 64},
                         "train.preprocess": {"short_side": 64, "long_side_max": 64}}))
        trainer.train(checkpoint_path=checkpoint)
        return learning_rates

    uninterrupted = run(tmp_path / "whole", 2)
    warmup = [1e-3 * (1 - (1 - i / 3) * (1 - 0.1)) for i in range(3)]  # mmcv's linear warmup
    assert list(uninterrupted) == [0, 1, 2, 3]
    assert [uninterrupted[i] for i in range(3)] == pytest.approx(warmup, rel=1e-12, abs=0)
    assert uninterrupted[3] == pytest.approx(1e-4, rel=1e-12, abs=0)
    run(tmp_path / "first", 1)
    resumed = run(tmp_path / "second", 2, checkpoint=str(tmp_path / "first" / "epoch_1.pth"))
    assert resumed == {2: uninterrupted[2], 3: uninterrupted[3]}
