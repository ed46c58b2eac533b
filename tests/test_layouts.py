"""Dataset layout detection for ``modelscope-seg train --data DIR``: COCO instances, COCO panoptic, semantic folders,
the synthetic layout, forced formats and split names, clear errors; the finetune script trains from each layout."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from modelscope_plugin.apps.cli import main as cli_main
from modelscope_plugin.data.datasets import read_label_folders
from modelscope_plugin.data.layouts import DatasetLayoutError, detect_layout
from modelscope_plugin.errors import DatasetProblemsError
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
    with pytest.raises(DatasetLayoutError, match="no image folder train/, images/train/ or images/"):
        detect_layout(tmp_path)


def roboflow_layout(synthetic: Path, root: Path, project_category_used: bool = False) -> Path:
    """Roboflow's COCO export: {train,valid}/_annotations.coco.json beside the images; category 0 names the project
    and is the supercategory of the classes."""
    for split, folder in (("train", "train"), ("val", "valid")):
        shutil.copytree(synthetic / split, root / folder)
        data = json.loads((synthetic / "annotations" / f"instances_{split}.json").read_text())
        data["categories"] = [{"id": 0, "name": "shapes", "supercategory": "none"}] + [
            dict(category, supercategory="shapes") for category in data["categories"]]
        if project_category_used and split == "val":
            data["annotations"][0]["category_id"] = 0
        (root / folder / "_annotations.coco.json").write_text(json.dumps(data))
    return root


def test_roboflow_export(synthetic, tmp_path):
    root = roboflow_layout(synthetic, tmp_path / "roboflow")
    layout = detect_layout(root)
    assert layout.format == "coco-instances" and (layout.train.name, layout.val.name) == ("train", "valid")
    assert layout.train.image_folder == root / "train" and layout.val.annotation_file == root / "valid" / \
        "_annotations.coco.json"
    # the project-level category 0 is not a class
    assert [(c["id"], c["name"]) for c in layout.categories] == list(enumerate(CLASS_NAMES[:4], start=1))
    assert [row["image_path"] for row in layout.rows(layout.val)] == [
        str(root / "valid" / "000001.png"), str(root / "valid" / "000002.png")]
    # ... unless an annotation uses it
    used = detect_layout(roboflow_layout(synthetic, tmp_path / "used", project_category_used=True))
    assert [c["name"] for c in used.categories] == ["shapes"] + CLASS_NAMES[:4]


def test_cvat_export_split_names_in_any_case_and_one_image_folder(synthetic, tmp_path):
    cvat = tmp_path / "cvat"
    (cvat / "annotations").mkdir(parents=True)
    for split, subset in (("train", "Train"), ("val", "Validation")):
        shutil.copy(synthetic / "annotations" / f"instances_{split}.json", cvat / "annotations" / f"instances_{subset}.json")
        shutil.copytree(synthetic / split, cvat / "images" / subset)
    layout = detect_layout(cvat)
    assert (layout.train.name, layout.val.name) == ("Train", "Validation")
    assert layout.val.image_folder == cvat / "images" / "Validation"
    # both splits' images in images/ itself
    flat = tmp_path / "flat"
    (flat / "annotations").mkdir(parents=True)
    shutil.copytree(synthetic / "train", flat / "images")
    shutil.copy(synthetic / "annotations" / "instances_train.json", flat / "annotations" / "instances_train.json")
    val = json.loads((synthetic / "annotations" / "instances_val.json").read_text())
    for image in val["images"]:
        shutil.copy(synthetic / "val" / image["file_name"], flat / "images" / f"val_{image['file_name']}")
        image["file_name"] = f"val_{image['file_name']}"
    (flat / "annotations" / "instances_val.json").write_text(json.dumps(val))
    layout = detect_layout(flat)
    assert layout.train.image_folder == layout.val.image_folder == flat / "images"
    assert [Path(row["image_path"]).name for row in layout.rows(layout.val)] == ["val_000001.png", "val_000002.png"]
    # labelme2coco keeps its own folder in file_name (JPEGImages/x.jpg): the image is found by its name
    train = json.loads((flat / "annotations" / "instances_train.json").read_text())
    for image in train["images"]:
        image["file_name"] = f"JPEGImages/{image['file_name']}"
    (flat / "annotations" / "instances_train.json").write_text(json.dumps(train))
    assert [row["image_path"] for row in detect_layout(flat).rows(layout.train, on_error="raise")] == [
        str(flat / "images" / "000001.png"), str(flat / "images" / "000002.png")]


VOC_PALETTE = [value for index in range(256) for value in (index * 37 % 256, index * 91 % 256, index * 53 % 256)]


def voc_layout(synthetic: Path, root: Path, label_folder: str = "SegmentationClass") -> dict:
    """PASCAL VOC: JPEGImages/, palette label PNGs (value = class; a row of 255, ignored, and a row of 0, background),
    ImageSets/Segmentation/{train,val}.txt. Returns the label arrays written, by stem."""
    from PIL import Image

    (root / "JPEGImages").mkdir(parents=True)
    (root / label_folder).mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    written = {}
    for split in ("train", "val"):
        stems = []
        for path in sorted((synthetic / split).glob("*.png")):
            stem = f"2007_{split}_{path.stem}"
            Image.open(path).convert("RGB").save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
            labels = np.array(Image.open(synthetic / "annotations" / f"semantic_{split}" / path.name), np.uint8)
            labels[0, :] = 255
            labels[1, :] = 0
            label_image = Image.fromarray(labels, mode="L").convert("P")
            label_image.putpalette(VOC_PALETTE)
            label_image.save(root / label_folder / f"{stem}.png")
            written[stem] = labels
            stems.append(stem)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(reversed(stems)) + "\n")
    return written


def test_pascal_voc_layout(synthetic, tmp_path):
    from modelscope_plugin.data.datasets import load_label_map

    root = tmp_path / "VOC2012"
    written = voc_layout(synthetic, root)
    layout = detect_layout(root)
    assert layout.format == "pascal-voc" and layout.default_task == "semantic"
    assert (layout.train.name, layout.val.name) == ("train", "val") and not layout.reduce_zero_label
    assert layout.train.label_folder == root / "SegmentationClass"
    # PASCAL VOC's 21 classes, value 0 = background
    assert [c["name"] for c in layout.categories][:3] == ["background", "aeroplane", "bicycle"]
    assert [c["id"] for c in layout.categories] == list(range(21))
    rows = layout.rows(layout.train)
    # the list's order, the JPEG of each stem
    assert [row["image_id"] for row in rows] == ["2007_train_000002", "2007_train_000001"]
    assert rows[0]["image_path"] == str(root / "JPEGImages" / "2007_train_000002.jpg")
    # palette indices are the classes; 255 is ignored
    labels = written["2007_train_000002"]
    classes = load_label_map(rows[0], ignore_label=-1)
    assert np.array_equal(classes, np.where(labels == 255, -1, labels.astype(np.int64)))
    assert (classes[1] == 0).all() and (classes[0] == -1).all()  # background is a class, the boundary is not
    # labelme2voc's class_names.txt names the classes
    (root / "class_names.txt").write_text("_background_\n" + "\n".join(CLASS_NAMES) + "\n")
    assert [c["name"] for c in detect_layout(root).categories] == ["_background_"] + CLASS_NAMES
    # a value beyond the classes named is found by the reader
    (root / "class_names.txt").write_text("_background_\ndisc\n")
    with pytest.raises(DatasetProblemsError, match="label value 7 is beyond the 2 classes"):
        detect_layout(root).rows(layout.train, on_error="raise")


def test_pascal_voc_label_folder_holding_the_split(synthetic, tmp_path):
    """SBD-augmented VOC: train_aug.txt (DeepLab's pairs of paths) names labels only SegmentationClassAug/ holds."""
    root = tmp_path / "VOC2012"
    voc_layout(synthetic, root, label_folder="SegmentationClassAug")
    (root / "SegmentationClass").mkdir()
    shutil.copy(root / "SegmentationClassAug" / "2007_train_000001.png", root / "SegmentationClass")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("".join(
        f"/JPEGImages/2007_train_{index}.jpg /SegmentationClassAug/2007_train_{index}.png\n"
        for index in ("000001", "000002")))
    layout = detect_layout(root, train_split="train_aug")
    assert layout.train.label_folder == root / "SegmentationClassAug"
    assert [image_id for image_id, _, _ in layout.train.pairs] == ["2007_train_000001", "2007_train_000002"]
    assert len(layout.rows(layout.train, on_error="raise")) == 2


def cityscapes_layout(synthetic: Path, root: Path, label_kind: str = "labelTrainIds") -> dict:
    """Cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png, gtFine/{split}/{city}/*_gtFine_{label_kind}.png
    (train ids: value = class, 0 = road, a row of 255 ignored); the COCO panoptic JSON of csCreatePanopticImgs (string
    image ids, file names without the city folder). Returns the label arrays written, by image id."""
    from PIL import Image

    written = {}
    for split in ("train", "val"):
        panoptic = json.loads((synthetic / "annotations" / f"panoptic_{split}.json").read_text())
        (root / "gtFine" / f"cityscapes_panoptic_{split}").mkdir(parents=True)
        for index, (image, annotation) in enumerate(zip(panoptic["images"], panoptic["annotations"])):
            city = ("aachen", "bochum")[index % 2]
            base = f"{city}_{('train', 'val').index(split):06d}_{index:06d}"
            for folder in (root / "leftImg8bit" / split / city, root / "gtFine" / split / city):
                folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(synthetic / split / image["file_name"], root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png")
            labels = np.array(Image.open(synthetic / "annotations" / f"semantic_{split}" / image["file_name"]), np.uint8)
            labels[0, :] = 255
            Image.fromarray(labels).save(root / "gtFine" / split / city / f"{base}_gtFine_{label_kind}.png")
            written[base] = labels
            shutil.copy(synthetic / "annotations" / f"panoptic_{split}" / annotation["file_name"],
                        root / "gtFine" / f"cityscapes_panoptic_{split}" / f"{base}_gtFine_panoptic.png")
            image.update(id=base, file_name=f"{base}_leftImg8bit.png")
            annotation.update(image_id=base, file_name=f"{base}_gtFine_panoptic.png")
        (root / "gtFine" / f"cityscapes_panoptic_{split}.json").write_text(json.dumps(panoptic))
    return written


def test_cityscapes_layouts(synthetic, tmp_path):
    from modelscope_plugin.data.datasets import load_label_map

    root = tmp_path / "cityscapes"
    written = cityscapes_layout(synthetic, root)
    # with csCreatePanopticImgs' JSON: COCO panoptic, images found in their city folders, string ids numbered
    layout = detect_layout(root)
    assert layout.format == "coco-panoptic" and layout.train.label_folder == root / "gtFine" / "cityscapes_panoptic_train"
    rows = layout.rows(layout.val, on_error="raise")
    assert [row["image_path"] for row in rows] == [
        str(root / "leftImg8bit" / "val" / "aachen" / "aachen_000001_000000_leftImg8bit.png"),
        str(root / "leftImg8bit" / "val" / "bochum" / "bochum_000001_000001_leftImg8bit.png")]
    assert [row["image_id"] for row in rows] == [1, 2]
    original = json.loads((synthetic / "annotations" / "panoptic_val.json").read_text())["annotations"]
    assert [[s["id"] for s in row["segments_info"]] for row in rows] == [
        [s["id"] for s in annotation["segments_info"]] for annotation in original]
    # the train-id label maps: the 19 classes, value = class (0 = road is a class), 255 ignored
    layout = detect_layout(root, "cityscapes")
    assert [c["name"] for c in layout.categories][:3] == ["road", "sidewalk", "building"]
    assert [c["id"] for c in layout.categories] == list(range(19)) and not layout.reduce_zero_label
    rows = layout.rows(layout.train, on_error="raise")
    assert [row["image_id"] for row in rows] == ["aachen_000000_000000", "bochum_000000_000001"]
    labels = written["bochum_000000_000001"].astype(np.int64)
    assert np.array_equal(load_label_map(rows[1], ignore_label=-1), np.where(labels == 255, -1, labels))


def test_cityscapes_without_train_ids_names_the_script_that_writes_them(synthetic, tmp_path):
    root = tmp_path / "cityscapes"
    cityscapes_layout(synthetic, root, label_kind="labelIds")
    with pytest.raises(DatasetLayoutError, match="no \\*_gtFine_labelTrainIds.png: .*csCreateTrainIdLabelImgs"):
        detect_layout(root, "cityscapes")


def ade20k_panoptic_layout(synthetic: Path, root: Path) -> Path:
    """Mask2Former's ADE20K preparation: ade20k_panoptic_{train,val}.json and PNG folders at the root, images in
    images/{training,validation}/; category ids from 0, as ADE20K's (here square, present in both splits, is 0)."""
    for split, folder in (("train", "training"), ("val", "validation")):
        shutil.copytree(synthetic / split, root / "images" / folder)
        shutil.copytree(synthetic / "annotations" / f"panoptic_{split}", root / f"ade20k_panoptic_{split}")
        panoptic = json.loads((synthetic / "annotations" / f"panoptic_{split}.json").read_text())
        for category in panoptic["categories"]:
            category["id"] = (category["id"] - 3) % 7
        for annotation in panoptic["annotations"]:
            for segment in annotation["segments_info"]:
                segment["category_id"] = (segment["category_id"] - 3) % 7
        (root / f"ade20k_panoptic_{split}.json").write_text(json.dumps(panoptic))
    return root


def test_ade20k_panoptic_preparation_with_category_id_0(synthetic, tmp_path):
    root = ade20k_panoptic_layout(synthetic, tmp_path / "ADEChallengeData2016")
    layout = detect_layout(root)
    assert layout.format == "coco-panoptic" and (layout.train.name, layout.val.name) == ("train", "val")
    assert layout.val.image_folder == root / "images" / "validation"
    assert layout.val.label_folder == root / "ade20k_panoptic_val"
    assert [(c["id"], c["name"]) for c in layout.categories] == [((index - 2) % 7, name)
                                                                 for index, name in enumerate(CLASS_NAMES)]
    rows = layout.rows(layout.val, on_error="raise")
    assert [row["image_path"] for row in rows] == [str(root / "images" / "validation" / f"00000{index}.png")
                                                   for index in (1, 2)]
    shutil.rmtree(root / "images" / "validation")
    with pytest.raises(DatasetLayoutError, match="ade20k_panoptic_val.json found but no folder images/validation/"):
        detect_layout(root)


def test_a_colour_label_map_is_refused_by_the_reader(synthetic, tmp_path):
    from PIL import Image

    root = semantic_layout(synthetic, tmp_path / "ade")
    colour = root / "annotations" / "training" / "000001.png"
    Image.open(colour).convert("RGB").save(colour)
    rows, problems = read_label_folders(str(root / "images" / "training"), str(root / "annotations" / "training"), 7)
    assert [row["image_id"] for row in rows] == ["000002"]
    assert [problem.image_id for problem in problems] == ["000001"]
    assert "is a RGB image: expected one label value per pixel" in problems[0].reason


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

    roboflow = roboflow_layout(synthetic, tmp_path / "roboflow")
    assert cli_main(train_command(roboflow, tmp_path / "roboflow_instances")) == 0
    trainer = built_trainers[-1]
    assert trainer.task == "instance" and [c.name for c in trainer.categories] == CLASS_NAMES[:4]

    cityscapes = tmp_path / "cityscapes"
    cityscapes_layout(synthetic, cityscapes)
    assert cli_main(train_command(cityscapes, tmp_path / "cityscapes_panoptic")) == 0
    trainer = built_trainers[-1]
    assert trainer.task == "panoptic" and [c.name for c in trainer.categories] == CLASS_NAMES
    assert len(next(iter(trainer.get_train_dataloader())).targets) == 2

    # ADE20K's category ids start at 0: category 0 (square, a thing here) is a class like any other
    ade_panoptic = ade20k_panoptic_layout(synthetic, tmp_path / "ADEChallengeData2016")
    assert cli_main(train_command(ade_panoptic, tmp_path / "ade_panoptic")) == 0
    trainer = built_trainers[-1]
    assert {c.id: c.name for c in trainer.categories}[0] == "square"
    panoptic = json.loads((synthetic / "annotations" / "panoptic_train.json").read_text())
    present = {CLASS_NAMES[s["category_id"] - 1] for a in panoptic["annotations"] for s in a["segments_info"]}
    names = [trainer.categories[int(label)].name for target in next(iter(trainer.get_train_dataloader())).targets
             for label in target.labels]
    assert set(names) <= present and "square" in names

    voc = tmp_path / "VOC2012"
    written = voc_layout(synthetic, voc)
    assert cli_main(train_command(voc, tmp_path / "voc")) == 0
    trainer = built_trainers[-1]
    assert trainer.task == "semantic" and trainer.model_config.class_names[:2] == ("background", "aeroplane")
    assert len(trainer.model_config.class_names) == 21
    assert trainer.eval_dataset[0]["reduce_zero_label"] is False
    # every training target is a class present in the written label maps, background (0) included
    batch = next(iter(trainer.get_train_dataloader()))
    present = set(np.unique(np.concatenate([labels.ravel() for labels in written.values()]))) - {255}
    labels = {int(label) for target in batch.targets for label in target.labels}
    assert labels and labels <= present

    # semantic folders cannot train instances: one error, before any model is written
    assert cli_main(train_command(ade, tmp_path / "refused", "--classes", str(ade / "classes.txt"),
                                  "--task", "instance")) == 1
    assert "(semantic-folders) cannot train the instance task" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    assert cli_main(train_command(tmp_path / "nothing_here", tmp_path / "missing")) == 1
    assert "does not exist" in capsys.readouterr().err


def test_data_without_a_held_out_split_holds_out_a_drawn_fraction(synthetic, tmp_path, built_trainers, capsys):
    """A single CVAT export (annotations/instances_default.json + images/): --val-fraction holds out images drawn
    with --seed, the same on every run, written to the work dir; the rest train."""
    cvat = tmp_path / "cvat"
    (cvat / "annotations").mkdir(parents=True)
    shutil.copytree(synthetic / "train", cvat / "images")
    merged = json.loads((synthetic / "annotations" / "instances_train.json").read_text())
    val = json.loads((synthetic / "annotations" / "instances_val.json").read_text())
    for image in val["images"]:
        shutil.copy(synthetic / "val" / image["file_name"], cvat / "images" / f"val_{image['file_name']}")
    merged["images"] += [dict(image, id=image["id"] + 100, file_name=f"val_{image['file_name']}")
                         for image in val["images"]]
    merged["annotations"] += [dict(annotation, id=annotation["id"] + 1000, image_id=annotation["image_id"] + 100)
                              for annotation in val["annotations"]]
    (cvat / "annotations" / "instances_default.json").write_text(json.dumps(merged))
    every_image = {1, 2, 101, 102}

    assert cli_main(train_command(cvat, tmp_path / "refused", "--train-split", "default")) == 1
    assert "no held-out split; name it with --val-split, or hold out" in capsys.readouterr().err
    held_out = []
    for run in ("first", "second"):
        work_dir = tmp_path / run
        assert cli_main(train_command(cvat, work_dir, "--train-split", "default", "--val-fraction", "0.5")) == 0
        written = json.loads((work_dir / "held_out_images.json").read_text())
        trainer = built_trainers[-1]
        evaluated = {row["image_id"] for row in trainer.eval_dataset}
        trained = {int(trainer.train_dataset.rows[index]["image_id"]) for index in range(len(trainer.train_dataset))}
        assert set(written["image_ids"]) == evaluated and len(evaluated) == 2
        assert trained == every_image - evaluated
        held_out.append(written["image_ids"])
    assert held_out[0] == held_out[1]
    # labelme2coco's output: annotations.json at the root, file names under JPEGImages/
    labelme = tmp_path / "labelme"
    shutil.copytree(cvat / "images", labelme / "JPEGImages")
    for image in merged["images"]:
        image["file_name"] = f"JPEGImages/{image['file_name']}"
    (labelme / "annotations.json").write_text(json.dumps(merged))
    layout = detect_layout(labelme)
    assert (layout.format, layout.train.name, layout.val) == ("coco-instances", "annotations", None)
    assert cli_main(train_command(labelme, tmp_path / "labelme_work", "--val-fraction", "0.5")) == 0
    assert json.loads((tmp_path / "labelme_work" / "held_out_images.json").read_text())["image_ids"] == held_out[0]
    assert built_trainers[-1].eval_dataset[0]["image_path"].startswith(str(labelme / "JPEGImages"))
    # data with a held-out split keeps it
    assert cli_main(train_command(synthetic, tmp_path / "both", "--val-fraction", "0.5")) == 1
    assert "--val-fraction is for data without a held-out split; this one has 'val'" in capsys.readouterr().err

# ------------------------------------------------------------------------------------ evaluate --data

def test_modelscope_seg_evaluate_scores_the_held_out_split_of_a_dataset_folder(synthetic, tmp_path, tiny_model_dir,
                                                                               capsys):
    """`evaluate --data DIR` = `evaluation.evaluate` on the layout's held-out rows, its categories and, for COCO AP,
    its instances JSON; the task follows the data."""
    from modelscope.pipelines import pipeline

    from modelscope_plugin.data.datasets import read_coco_instances, read_coco_panoptic, read_label_pairs
    from modelscope_plugin.data.layouts import VOC_CLASSES
    from modelscope_plugin.evaluation import evaluate

    segmenter = pipeline("image-segmentation", model=str(tiny_model_dir), device="cpu")
    voc, roboflow = tmp_path / "VOC2012", roboflow_layout(synthetic, tmp_path / "roboflow")
    voc_layout(synthetic, voc)
    val_pairs = [(stem, voc / "JPEGImages" / f"{stem}.jpg", voc / "SegmentationClass" / f"{stem}.png")
                 for stem in ("2007_val_000002", "2007_val_000001")]
    voc_categories = [{"id": index, "name": name, "isthing": False} for index, name in enumerate(VOC_CLASSES)]
    roboflow_json = roboflow / "valid" / "_annotations.coco.json"
    cases = {
        # folder -> (task, the rows and evaluate() arguments written out by hand)
        voc: ("semantic", read_label_pairs(val_pairs, 21, reduce_zero_label=False)[0],
              dict(categories=voc_categories)),
        roboflow: ("instance", read_coco_instances(str(roboflow_json), str(roboflow / "valid"))[0],
                   dict(annotation_file=str(roboflow_json), categories=[
                       {"id": index, "name": name, "isthing": True} for index, name in enumerate(CLASS_NAMES[:4], 1)])),
        synthetic: ("panoptic", read_coco_panoptic(str(synthetic / "annotations" / "panoptic_val.json"),
                                                   str(synthetic / "annotations" / "panoptic_val"),
                                                   str(synthetic / "val"))[0],
                    dict(categories=json.loads((synthetic / "annotations" / "panoptic_val.json").read_text())[
                        "categories"])),
    }
    for folder, (task, rows, evaluate_arguments) in cases.items():
        output = tmp_path / f"evaluate_{folder.name}"
        assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--data", str(folder), "--output", str(output),
                         "--quiet"]) == 0, capsys.readouterr().err
        written = json.loads((output / "metrics.json").read_text())
        direct = json.loads(json.dumps(evaluate(segmenter, rows, task, progress=False, **evaluate_arguments)))
        assert written["task"] == task and {key: value for key, value in written.items() if key != "task"} == direct
    capsys.readouterr()
    # the task must be one the data holds; --data replaces --images
    assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--data", str(voc), "--task", "instance",
                     "--output", str(tmp_path / "refused"), "--quiet"]) == 1
    assert "(pascal-voc) cannot score the instance task" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(tiny_model_dir), "--data", str(voc), "--images", str(voc),
                     "--output", str(tmp_path / "both"), "--quiet"]) == 1
    assert "without --images" in capsys.readouterr().err
