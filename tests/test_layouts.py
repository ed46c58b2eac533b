"""Dataset layout detection for ``modelscope-seg train --data DIR``: COCO instances, COCO panoptic, semantic folders,
the synthetic layout, forced formats and split names, clear errors; the finetune script trains from each layout."""
import json
import shutil
from pathlib import Path

import pytest

from modelscope_plugin.apps.cli import main as cli_main
from modelscope_plugin.data.layouts import DatasetLayoutError, detect_layout
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, SyntheticSplit, write_dataset

SCENES = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)
CLASS_NAMES = [c.name for c in SYNTHETIC_CATEGORIES]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts") / "synthetic"
    write_dataset(root, "train", 2, seed=0, config=SCENES)
    write_dataset(root, "val", 2, seed=1, config=SCENES)
    return root


def coco_instances_layout(synthetic: Path, root: Path, images_under: str = "images") -> Path:
    """COCO's own names: annotations/instances_{train,val}2017.json, images in {images_under}/{train,val}2017/."""
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(synthetic / "annotations" / f"instances_{split}.json",
                    root / "annotations" / f"instances_{split}2017.json")
        shutil.copytree(synthetic / split, root / images_under / f"{split}2017")
    return root


def panoptic_layout_with_pngs_at_the_root(synthetic: Path, root: Path) -> Path:
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(synthetic / "annotations" / f"panoptic_{split}.json",
                    root / "annotations" / f"panoptic_{split}2017.json")
        shutil.copytree(synthetic / "annotations" / f"panoptic_{split}", root / f"panoptic_{split}2017")
        shutil.copytree(synthetic / split, root / "images" / f"{split}2017")
    return root


def semantic_layout(synthetic: Path, root: Path, splits=("training", "validation")) -> Path:
    for split, name in zip(("train", "val"), splits):
        shutil.copytree(synthetic / split, root / "images" / name)
        shutil.copytree(synthetic / "annotations" / f"semantic_{split}", root / "annotations" / name)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


@pytest.mark.parametrize("images_under", ["images", "."])
def test_coco_instances_layout(synthetic, tmp_path, images_under):
    root = coco_instances_layout(synthetic, tmp_path / "coco", images_under)
    layout = detect_layout(root)
    assert layout.format == "coco-instances" and layout.default_task == "instance"
    assert (layout.train.name, layout.val.name) == ("train2017", "val2017")
    assert layout.train.image_folder == (root / images_under / "train2017")
    assert [c["name"] for c in layout.categories] == CLASS_NAMES[:4] and all(c["isthing"] for c in layout.categories)
    rows = layout.rows(layout.train)
    assert len(rows) == 2 and "annotations_json" in rows[0]


def test_coco_panoptic_layout_with_the_png_folder_at_the_root(synthetic, tmp_path):
    root = panoptic_layout_with_pngs_at_the_root(synthetic, tmp_path / "coco")
    layout = detect_layout(root)
    assert layout.format == "coco-panoptic" and layout.default_task == "panoptic"
    assert layout.train.label_folder == root / "panoptic_train2017"
    assert layout.train.image_folder == root / "images" / "train2017"
    assert [c["name"] for c in layout.categories] == CLASS_NAMES
    assert layout.instances_val_file is None
    # COCO AP ground truth from the panoptic thing segments: the same objects as the instances JSON
    converted = layout.instance_evaluation_rows(layout.val)
    original = SyntheticSplit(synthetic, "val").instance_rows()
    for ours, theirs in zip(converted, original):
        ours_annotations, their_annotations = json.loads(ours["annotations_json"]), json.loads(theirs["annotations_json"])
        assert [(a["category_id"], a["segmentation"]["counts"]) for a in ours_annotations] == [
            (a["category_id"], a["segmentation"]["counts"]) for a in their_annotations]


def test_the_synthetic_layout_is_panoptic_and_instances_can_be_forced(synthetic):
    layout = detect_layout(synthetic)  # holds instances and panoptic annotations: panoptic wins
    assert layout.format == "coco-panoptic" and (layout.train.name, layout.val.name) == ("train", "val")
    assert layout.train.label_folder == synthetic / "annotations" / "panoptic_train"
    assert layout.instances_val_file == synthetic / "annotations" / "instances_val.json"
    forced = detect_layout(synthetic, "coco-instances")
    assert forced.format == "coco-instances" and forced.train.image_folder == synthetic / "train"


def test_semantic_folders_take_class_names_from_a_file(synthetic, tmp_path):
    root = semantic_layout(synthetic, tmp_path / "ade")
    layout = detect_layout(root, classes_file=str(root / "classes.txt"))
    assert layout.format == "semantic-folders" and layout.default_task == "semantic"
    # line i = label value i, from 1 (value 0 is ignored)
    assert [(c["id"], c["name"]) for c in layout.categories] == list(enumerate(CLASS_NAMES, start=1))
    assert len(layout.rows(layout.val)) == 2
    from_zero = detect_layout(root, classes_file=str(root / "classes.txt"), reduce_zero_label=False)
    assert [c["id"] for c in from_zero.categories] == list(range(7))
    with pytest.raises(DatasetLayoutError, match="need --classes FILE"):
        detect_layout(root)


def test_split_names(synthetic, tmp_path):
    root = semantic_layout(synthetic, tmp_path / "ade", splits=("train", "val"))
    with pytest.raises(DatasetLayoutError, match="no known dataset layout"):
        detect_layout(root, classes_file=str(root / "classes.txt"))
    layout = detect_layout(root, train_split="train", val_split="val", classes_file=str(root / "classes.txt"))
    assert (layout.train.name, layout.val.name) == ("train", "val")
    coco = coco_instances_layout(synthetic, tmp_path / "coco")
    shutil.copy(coco / "annotations" / "instances_train2017.json", coco / "annotations" / "instances_train2014.json")
    with pytest.raises(DatasetLayoutError, match="several instances train annotation files .* --train-split"):
        detect_layout(coco)
    assert detect_layout(coco, train_split="train2017").train.name == "train2017"


def test_an_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "pictures").mkdir()
    with pytest.raises(DatasetLayoutError) as raised:
        detect_layout(tmp_path)
    message = str(raised.value)
    assert f"no known dataset layout under {tmp_path}" in message
    for looked_for in ("annotations/panoptic_train*.json", "annotations/instances_train*.json", "images/training/"):
        assert looked_for in message
    with pytest.raises(DatasetLayoutError, match="format must be one of"):
        detect_layout(tmp_path, "voc")
    # a JSON without its image folder names what is missing
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(DatasetLayoutError, match="no image folder train/ or images/train/"):
        detect_layout(tmp_path)


# ------------------------------------------------------------------------------------ the finetune script

@pytest.fixture
def built_trainers(monkeypatch):
    """The finetune script builds its trainer (datasets included) but neither trains nor evaluates."""
    from modelscope_plugin.integration.trainer import SegmentationTrainer

    built = []
    monkeypatch.setattr(SegmentationTrainer, "train", lambda self, checkpoint_path=None: built.append(self))
    monkeypatch.setattr(SegmentationTrainer, "evaluate", lambda self, *arguments, **kwargs: {})
    monkeypatch.setattr(SegmentationTrainer, "evaluation_results", {}, raising=False)
    return built


def train_command(data: Path, work_dir: Path, *extra):
    return ["train", "--data", str(data), "--architecture", "tiny", "--image-size", "64", "--batch-size", "2",
            "--workers", "0", "--work-dir", str(work_dir), *extra]


def test_modelscope_seg_train_follows_the_data(synthetic, tmp_path, built_trainers, capsys):
    coco = coco_instances_layout(synthetic, tmp_path / "coco")
    assert cli_main(train_command(coco, tmp_path / "instances")) == 0
    trainer = built_trainers[-1]
    assert trainer.task == "instance" and [c.name for c in trainer.categories] == CLASS_NAMES[:4]
    assert next(iter(trainer.get_train_dataloader())).images.shape[0] == 2

    ade = semantic_layout(synthetic, tmp_path / "ade")
    assert cli_main(train_command(ade, tmp_path / "semantic", "--classes", str(ade / "classes.txt"))) == 0
    trainer = built_trainers[-1]
    assert trainer.task == "semantic" and trainer.model_config.class_names == tuple(CLASS_NAMES)
    assert "label_path" in trainer.eval_dataset[0]

    assert cli_main(train_command(synthetic, tmp_path / "panoptic")) == 0
    assert built_trainers[-1].task == "panoptic"

    # semantic folders cannot train instances: one error, before any model is written
    assert cli_main(train_command(ade, tmp_path / "refused", "--classes", str(ade / "classes.txt"),
                                  "--task", "instance")) == 1
    assert "(semantic-folders) cannot train the instance task" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert cli_main(train_command(tmp_path / "nothing_here", tmp_path / "missing")) == 1
    assert "does not exist" in capsys.readouterr().err
