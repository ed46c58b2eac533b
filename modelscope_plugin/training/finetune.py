"""Finetune (or train from scratch) a Mask2Former or a FastInst on a dataset folder: MsDataset -> trainer ->
evaluation.

    python -m modelscope_plugin.training.finetune --data data/synthetic --generate 2000 --architecture small \\
        --work-dir outputs/m2f_synthetic --epochs 50 --batch-size 8
    torchrun --nproc_per_node=2 -m modelscope_plugin.training.finetune ... --launcher pytorch

``--data`` is a dataset folder in one of the layouts of ``modelscope_plugin.data.layouts`` (COCO panoptic, COCO
instances (Roboflow's export too), ADE20K-style semantic folders with ``--classes FILE``, PASCAL VOC, Cityscapes;
``--format`` forces one, ``--train-split`` / ``--val-split`` name the splits); the default ``--task`` follows the
data (panoptic / instance / semantic; FastInst: instance). ``--generate N`` writes N synthetic training scenes with
``--seed`` and N // 5 validation scenes with ``--seed + 1``, the held-out split, unless they exist (the synthetic
layout is a COCO panoptic one). Instance training leaves out images without objects (detectron2's
``FILTER_EMPTY_ANNOTATIONS``) unless ``--keep-empty-images``. ``--model`` starts from a model directory or hub id
(the class head is re-initialised for the dataset's classes); without it a randomly initialised network of
``--architecture`` is the start (``fastinst-d1`` / ``fastinst-d3``: FastInst R50 with 1 / 3 decoder layers;
``fastinst-small``: FastInst-D3 on the small Mask2Former's backbone; instance task only). From random weights,
``--classification-pretrain-epochs N`` first trains the backbone to classify the training things, then
``--pretrain-epochs N`` trains the backbone and pixel decoder as a per-pixel semantic segmenter
(``training.pretrain``: the stand-in for the ImageNet backbone the recipes assume; written to
``{work_dir}/pretrained_model`` and reused on a resume). The finetuned model directory is ``{work_dir}/output``
(``pipeline(Tasks.image_segmentation, model=...)`` loads it) and the held-out metrics are written to
``{work_dir}/metrics.json``.
"""
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from modelscope_plugin.config import Mask2FormerConfig, ResNetConfig, SwinConfig
from modelscope_plugin.data.datasets import has_objects
from modelscope_plugin.data.layouts import FORMATS, read_class_names
from modelscope_plugin.errors import DatasetLayoutError, ModelDirError
from modelscope_plugin.model_dirs.classes import THING_IDS_HELP, thing_ids_option

ARCHITECTURES = {
    # the unit tests' network (about 2 M parameters)
    "tiny": dict(backbone=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                                     drop_path_rate=0.0),
                 num_queries=20, hidden_dim=64, num_heads=4, encoder_layers=2, encoder_feedforward_dim=128,
                 decoder_layers=3, decoder_feedforward_dim=128),
    # the demo model's network: a half-width ResNet-18 (which learns shapes from random weights far faster than a
    # small Swin), 50 queries, 128 wide, 6 masked-attention layers (about 19 MB)
    "small": dict(backbone=ResNetConfig(depth=18, width=32),
                  num_queries=50, hidden_dim=128, num_heads=8, encoder_layers=3, encoder_feedforward_dim=256,
                  decoder_layers=6, decoder_feedforward_dim=256),
    # the same on the tiny Swin
    "small-swin": dict(backbone=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7,
                                           drop_path_rate=0.0),
                       num_queries=50, hidden_dim=128, num_heads=8, encoder_layers=3, encoder_feedforward_dim=512,
                       decoder_layers=6, decoder_feedforward_dim=384),
}

# images a step of the classification pretraining (about 28 things in the synthetic scenes)
CLASSIFICATION_PRETRAIN_IMAGES = 4

FASTINST_ARCHITECTURES = {
    # FastInst R50 (the official widths) with 1 or 3 dual-path decoder layers
    "fastinst-d1": dict(decoder_layers=1), "fastinst-d3": dict(decoder_layers=3),
    # the demo model's network: the small Mask2Former's ResNet under FastInst-D3, 128 wide, 50 queries (about 20 MB)
    "fastinst-small": dict(backbone=ResNetConfig(depth=18, width=32), hidden_dim=128, mask_dim=128, feedforward_dim=256,
                           num_queries=50, decoder_layers=3),
    "fastinst-small-swin": dict(backbone=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8),
                                                    window_size=7, drop_path_rate=0.0),
                                hidden_dim=128, mask_dim=128, feedforward_dim=256, num_queries=50, decoder_layers=3),
}


def initial_model_dir(directory: Path, architecture: str, categories: List[Dict[str, Any]], image_size: int,
                      seed: int) -> Path:
    """A randomly initialised network of ``architecture`` in the native model-directory layout (FastInst: the hub
    layout, classes = the dataset's things)."""
    from modelscope_plugin.builders import build_fastinst, build_mask2former
    from modelscope_plugin.config import FastInstConfig, PreprocessConfig

    things = [c for c in categories if c["isthing"]]
    stuff = [c for c in categories if not c["isthing"]]
    if architecture in FASTINST_ARCHITECTURES:
        fastinst = FastInstConfig(
            **FASTINST_ARCHITECTURES[architecture], num_classes=len(things),
            class_names=tuple(c["name"] for c in things),
            category_ids=tuple(c["id"] for c in things),
            preprocess=PreprocessConfig(short_side=image_size, long_side_max=image_size, resize_backend="pil",
                                        divide_by_std=True))
        torch.manual_seed(seed)
        return write_network_dir(directory, fastinst, build_fastinst(fastinst))
    config = Mask2FormerConfig(
        **ARCHITECTURES[architecture], num_things_classes=len(things), num_stuff_classes=len(stuff),
        class_names=tuple(c["name"] for c in things + stuff), category_ids=tuple(c["id"] for c in things + stuff),
        preprocess=PreprocessConfig(short_side=image_size, long_side_max=image_size))
    torch.manual_seed(seed)
    return write_network_dir(directory, config, build_mask2former(config))


def write_network_dir(directory: Path, config, network) -> Path:
    """A Mask2Former in the native model-directory layout, a FastInst in the hub layout."""
    from modelscope_plugin.config import FastInstConfig
    from modelscope_plugin.model_dirs.fastinst import write_hub_dir
    from modelscope_plugin.model_dirs.native import write_model_dir

    if isinstance(config, FastInstConfig):
        return write_hub_dir(directory, config, network, finetuned=True)
    return write_model_dir(directory, config, network)


def pretrained_model_dir(directory: Path, start: str, rows, categories, augmentation: Dict[str, Any],
                         arguments, evaluation_rows=()) -> Path:
    """``start``'s network after ``training.pretrain``'s classification (its held-out accuracy printed on
    ``evaluation_rows``) and then dense pretraining (the epochs of each from ``arguments``; written once, then reused
    on a resume)."""
    from modelscope_plugin.model_dirs.load import load_model_dir
    from modelscope_plugin.training.pretrain import pretrain_classification, pretrain_dense

    if (directory / "configuration.json").is_file():
        return directory
    if arguments.launcher:
        raise SystemExit("run the pretraining before starting torchrun (once without --launcher)")
    config, network = load_model_dir(start)
    if arguments.classification_pretrain_epochs:
        pretrain_classification(network, config.preprocess, rows, categories, arguments.classification_pretrain_epochs,
                                batch_size=CLASSIFICATION_PRETRAIN_IMAGES, lr=arguments.classification_pretrain_lr,
                                seed=arguments.seed, evaluation_rows=evaluation_rows)
    if arguments.pretrain_epochs:
        pretrain_dense(network, config.preprocess, rows, categories, augmentation, arguments.pretrain_epochs,
                       arguments.batch_size, arguments.lr, arguments.seed)
    return write_network_dir(directory, config, network)


def fastinst_augmentation(image_size: int) -> Dict[str, Any]:
    """Official FastInst's augmentation (short sides 416-640, long side <= 853, crops of 384-600 after a resize to
    400-600) scaled from its 640 test size to ``image_size``, on a square ``image_size`` canvas."""
    scale = image_size / 640

    def scaled(values):
        return sorted({max(32, int(round(value * scale))) for value in values})

    return {"kind": "fastinst", "image_size": image_size, "short_sides": scaled(range(416, 641, 32)),
            "long_side_max": image_size, "crop_short_sides": scaled((400, 500, 600)),
            "crop_size_range": scaled((384, 600))}


def hold_out(rows: List[Dict[str, Any]], fraction: float, seed: int):
    """(training rows, held-out rows): ``fraction`` of the images (at least one, and at least one left to train),
    drawn with ``seed``, so every rank and every resume holds out the same images; each list keeps the rows' order."""
    if not 0 < fraction < 1:
        raise DatasetLayoutError(f"--val-fraction must be between 0 and 1, not {fraction:g}")
    count = min(max(1, round(fraction * len(rows))), len(rows) - 1)
    if count < 1:
        raise DatasetLayoutError(f"--val-fraction needs at least 2 training images; the split has {len(rows)}")
    chosen = set(np.random.default_rng(seed).permutation(len(rows))[:count].tolist())
    return ([row for index, row in enumerate(rows) if index not in chosen],
            [row for index, row in enumerate(rows) if index in chosen])


def dataset_categories(panoptic_json: Path) -> List[Dict[str, Any]]:
    with open(panoptic_json) as handle:
        return [{"id": c["id"], "name": c["name"], "isthing": bool(c["isthing"])}
                for c in json.load(handle)["categories"]]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder: COCO panoptic, COCO instances, semantic "
                        "folders, PASCAL VOC or Cityscapes (see modelscope_plugin.data.layouts)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="force a layout (default: detected; "
                        "panoptic before instances when a folder holds both)")
    parser.add_argument("--train-split", default=None, help="training split name (default: the *_train*.json "
                        "annotation file, Roboflow's train/, 'training' for semantic folders, 'train' for VOC, "
                        "Cityscapes)")
    parser.add_argument("--val-split", default=None, help="held-out split name (default: *_val*.json, Roboflow's "
                        "valid/, 'validation', VOC's and Cityscapes' 'val')")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="data without a held-out split (a single CVAT or labelme export): hold out this fraction "
                             "of the training images, drawn with --seed (their ids: WORK_DIR/held_out_images.json)")
    parser.add_argument("--classes", default=None, help="semantic folders, PASCAL VOC: class names, one per line, "
                        "line i = label value i (semantic folders: from 1, value 0 is ignored, ADE20K's "
                        "reduce-zero-label; VOC: from 0 = background; default VOC's 21 or class_names.txt)")
    parser.add_argument("--no-reduce-zero-label", dest="reduce_zero_label", action="store_const", const=False,
                        default=None, help="semantic folders: label value 0 is a class (the first line of --classes)")
    parser.add_argument("--reduce-zero-label", dest="reduce_zero_label", action="store_const", const=True,
                        help="PASCAL VOC: label value 0 is ignored and line i of --classes names value i, from 1")
    parser.add_argument("--ignore-value", type=int, default=255, help="semantic folders: ignored label value")
    parser.add_argument("--keep-empty-images", action="store_true",
                        help="instance training: keep images without objects (default: left out, as detectron2)")
    parser.add_argument("--generate", type=int, default=0, help="write this many synthetic training scenes first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model directory, hub id, Hugging Face folder or checkpoint file "
                        "(EasyCV export, FastInst release, detectron2 .pkl) to start from")
    parser.add_argument("--model-classes", default=None, metavar="FILE",
                        help="--model's own class names, one per line, for a checkpoint that records none")
    parser.add_argument("--thing-ids", type=thing_ids_option, default=None, metavar="I,J,...",
                        help=f"--model's {THING_IDS_HELP}")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES) + sorted(FASTINST_ARCHITECTURES),
                        default="small")
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--task", choices=("panoptic", "instance", "semantic"), default=None,
                        help="default: instance for the FastInst architectures, else what the data holds "
                             "(COCO panoptic: panoptic, COCO instances: instance, semantic folders: semantic)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8, help="images per process")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--backbone-lr-multiplier", type=float, default=None,
                        help="backbone lr factor; default 0.1 (detectron2's, for a pretrained backbone) with --model, "
                             "1.0 when training from random weights")
    parser.add_argument("--image-size", type=int, default=256, help="test-time size, and the training crop "
                        "unless --crop-size")
    parser.add_argument("--crop-size", type=int, default=0,
                        help="train on large-scale-jitter crops of this side (both architectures) from the scenes "
                             "jittered at --image-size: each step costs about (crop / image size)^2 as much")
    parser.add_argument("--min-scale", type=float, default=0.5,
                        help="large-scale jitter range (Mask2Former; FastInst with --crop-size)")
    parser.add_argument("--max-scale", type=float, default=1.5,
                        help="large-scale jitter range (Mask2Former; FastInst with --crop-size)")
    parser.add_argument("--pretrain-epochs", type=int, default=0,
                        help="from random weights: first train the backbone and pixel decoder as a per-pixel "
                             "semantic segmenter for this many epochs (training.pretrain)")
    parser.add_argument("--classification-pretrain-epochs", type=int, default=0,
                        help="from random weights, before that: train the backbone to classify the training things "
                             "(each pooled over its mask from its whole image) for this many epochs")
    parser.add_argument("--classification-pretrain-lr", type=float, default=2e-3,
                        help="peak of the classification pretraining's one-cycle schedule (batches of "
                             f"{CLASSIFICATION_PRETRAIN_IMAGES} images)")
    parser.add_argument("--num-points", type=int, default=12544)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--evaluate-every", type=int, default=10, help="epochs between held-out evaluations")
    parser.add_argument("--resume", default=None, help="checkpoint prefix (work_dir/iter_N) or 'latest'")
    parser.add_argument("--launcher", default=None, help="'pytorch' under torchrun")
    arguments = parser.parse_args(argv)

    from modelscope.trainers import build_trainer

    import modelscope_plugin  # noqa: F401  (registers the trainer and metrics)
    from modelscope_plugin.data.datasets import as_ms_dataset
    from modelscope_plugin.data.layouts import ROW_KIND_OF_FORMAT, detect_layout
    from modelscope_plugin.data.synthetic import SceneConfig, SyntheticSplit, write_dataset
    from modelscope_plugin.model_dirs.eomt import is_eomt_dir
    from modelscope_plugin.ranks import rank_and_world_size
    from modelscope_plugin.training.checkpoint import latest_checkpoint
    from modelscope_plugin.training.config import ParameterGroupConfig
    from modelscope_plugin.training.data import TASKS_OF_ROW_KIND, TrainingDataError

    data = Path(arguments.data)
    rank, _ = rank_and_world_size()
    if arguments.generate and not SyntheticSplit(data, "train").panoptic_json.is_file():
        if arguments.launcher:
            raise SystemExit("generate the dataset before starting torchrun (run once without --launcher)")
        scenes = SceneConfig.scaled(arguments.image_size)
        write_dataset(data, "train", arguments.generate, arguments.seed, scenes)
        write_dataset(data, "val", max(arguments.generate // 5, 1), arguments.seed + 1, scenes)
    layout = detect_layout(data, arguments.format, arguments.train_split, arguments.val_split, arguments.classes,
                           reduce_zero_label=arguments.reduce_zero_label, ignore_value=arguments.ignore_value)
    if layout.val is None and arguments.val_fraction is None:
        raise DatasetLayoutError(f"{data}: {layout.format} training split {layout.train.name!r} found, but no "
                                 "held-out split; name it with --val-split, or hold out part of the training images "
                                 "with --val-fraction 0.1")
    if layout.val is not None and arguments.val_fraction is not None:
        raise DatasetLayoutError(f"{data}: --val-fraction is for data without a held-out split; this one has "
                                 f"{layout.val.name!r}")
    if arguments.task is None:
        arguments.task = "instance" if arguments.architecture in FASTINST_ARCHITECTURES else layout.default_task
    supported, reason = TASKS_OF_ROW_KIND[ROW_KIND_OF_FORMAT[layout.format]]
    if arguments.task not in supported:
        raise TrainingDataError(f"{data} ({layout.format}) cannot train the {arguments.task} task ({reason}); it "
                                f"can train: {', '.join(supported)}")
    if (arguments.pretrain_epochs or arguments.classification_pretrain_epochs) and layout.format != "coco-panoptic":
        raise DatasetLayoutError("--pretrain-epochs and --classification-pretrain-epochs need COCO panoptic data")
    categories = layout.categories
    filter_empty = arguments.task == "instance" and not arguments.keep_empty_images
    work_dir = Path(arguments.work_dir)
    # COCO AP scores instance rows (their RLE annotations); PQ and mIoU read the panoptic or label PNGs
    if layout.val is not None:
        train_rows = layout.rows(layout.train, filter_empty=filter_empty)
        evaluation_rows = (layout.instance_evaluation_rows(layout.val) if arguments.task == "instance"
                           else layout.rows(layout.val))
        held_out_name = layout.val.name
    else:
        train_rows, held_out_rows = hold_out(layout.rows(layout.train), arguments.val_fraction, arguments.seed)
        train_rows = [row for row in train_rows if has_objects(row)] if filter_empty else train_rows
        evaluation_rows = layout.as_instance_rows(held_out_rows) if arguments.task == "instance" else held_out_rows
        held_out_name = f"{arguments.val_fraction:g} of {layout.train.name}"
        if rank == 0:
            work_dir.mkdir(parents=True, exist_ok=True)
            (work_dir / "held_out_images.json").write_text(json.dumps({
                "split": layout.train.name, "fraction": arguments.val_fraction, "seed": arguments.seed,
                "image_ids": [row["image_id"] for row in held_out_rows]}, indent=1))
    if arguments.architecture in FASTINST_ARCHITECTURES and not arguments.crop_size:
        augmentation = fastinst_augmentation(arguments.image_size)
    else:
        augmentation = {"kind": "large_scale_jitter", "image_size": arguments.image_size,
                        "crop_size": arguments.crop_size, "min_scale": arguments.min_scale,
                        "max_scale": arguments.max_scale}
    model = arguments.model
    if model is None:
        model = str(work_dir / "initial_model")
        if not Path(model, "configuration.json").is_file():
            initial_model_dir(Path(model), arguments.architecture, categories, arguments.image_size, arguments.seed)
        if arguments.pretrain_epochs or arguments.classification_pretrain_epochs:
            model = str(pretrained_model_dir(work_dir / "pretrained_model", model, train_rows,
                                             categories, augmentation, arguments,
                                             evaluation_rows=(layout.rows(layout.val) if layout.val is not None
                                                              else held_out_rows)[:100]))

    backbone_lr_multiplier = arguments.backbone_lr_multiplier
    if backbone_lr_multiplier is None:
        backbone_lr_multiplier = ParameterGroupConfig().backbone_lr_multiplier if arguments.model else 1.0
    options = {
        "train.task": arguments.task, "train.max_epochs": arguments.epochs,
        "train.dataloader": {"batch_size_per_gpu": arguments.batch_size, "workers_per_gpu": arguments.workers},
        "train.optimizer.lr": arguments.lr,
        "train.optimizer.paramwise_options": {"backbone_lr_multiplier": backbone_lr_multiplier},
        "train.augmentation": augmentation,
        "train.preprocess": {"short_side": arguments.image_size, "long_side_max": arguments.image_size},
        "train.loss": {"num_points": arguments.num_points},
        "train.logging": {"interval": 10},
        "train.checkpoint.period": {"interval": 1, "by_epoch": True, "max_checkpoint_num": 2},
        "evaluation.period": {"interval": arguments.evaluate_every, "by_epoch": True},
    }
    if is_eomt_dir(model):  # layer-wise lr decay (train.optimizer.layer_decay) instead of a backbone multiplier
        del options["train.optimizer.paramwise_options"]
    arguments_of_trainer: Dict[str, Any] = dict(
        model=model, train_dataset=as_ms_dataset(train_rows), eval_dataset=as_ms_dataset(evaluation_rows),
        work_dir=str(work_dir), categories=categories,
        cfg_options=options, seed=arguments.seed)
    if arguments.model_classes:
        if not Path(arguments.model_classes).is_file():
            raise ModelDirError(f"--model-classes {arguments.model_classes}: no such file")
        arguments_of_trainer["class_names"] = read_class_names(arguments.model_classes)
    if arguments.thing_ids is not None:
        arguments_of_trainer["thing_ids"] = arguments.thing_ids
    if arguments.launcher:
        arguments_of_trainer["launcher"] = arguments.launcher
    trainer = build_trainer("mask2former-segmentation", arguments_of_trainer)
    checkpoint = latest_checkpoint(work_dir) if arguments.resume == "latest" else arguments.resume
    trainer.train(checkpoint_path=checkpoint)
    results = trainer.evaluate()
    if rank == 0:
        report = {"task": arguments.task, "data_format": layout.format, "held_out_split": held_out_name,
                  "metrics": results,
                  "per_class": trainer.evaluation_results.get("per_class"), "model_dir": str(work_dir / "output")}
        (work_dir / "metrics.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
