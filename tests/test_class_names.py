"""Class names and thing classes for checkpoints that do not record them: one clear error without them, and the ways
to give them (``class_names=``, ``thing_ids=``, ``--classes FILE``, ``--thing-ids``); Hugging Face folders read
``preprocessor_config.json`` and recognise the built-in class sets by name."""
import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import SHARED_DATA, shape_weights
from test_detectron2_release import resnet_config, write_detectron2_pkl

from modelscope_plugin.apps.cli import main
from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.config import Mask2FormerConfig, PreprocessConfig, ResNetConfig
from modelscope_plugin.data.categories import ADE20K_CLASSES, COCO_PANOPTIC_CATEGORIES
from modelscope_plugin.errors import ModelDirError
from modelscope_plugin.model_dirs.hf import name_classes, preprocess_from_processor
from modelscope_plugin.model_dirs.load import load_model

IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"
NAMES = ["road", "tree", "car", "sky", "person"]


@pytest.fixture(scope="module")
def five_class_pkl(tmp_path_factory):
    config = replace(resnet_config(), num_things_classes=5, num_stuff_classes=0)
    torch.manual_seed(0)
    network = build_mask2former(config).eval()
    shape_weights(network)
    return write_detectron2_pkl(tmp_path_factory.mktemp("pkl") / "model_final_five.pkl", network, config)


def test_thing_ids_put_those_classes_first_without_changing_any_score(five_class_pkl):
    plain_config, plain = load_model(five_class_pkl, class_names=NAMES)
    config, network = load_model(five_class_pkl, class_names=NAMES, thing_ids=[4, 2])
    assert config.class_names == ("person", "car", "road", "tree", "sky")
    assert (config.num_things_classes, config.num_stuff_classes, config.task) == (2, 3, "panoptic")
    assert plain_config.task == "semantic" and plain_config.num_things_classes == 5
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, reordered = plain(images).class_logits, network(images).class_logits  # (1, Q, 6)
    # the same scores in the new order (a matrix product may round its reordered rows differently by an ulp)
    torch.testing.assert_close(reordered, expected[..., [4, 2, 0, 1, 3, 5]], rtol=1e-6, atol=1e-5)
    assert not torch.allclose(reordered, expected)
    with pytest.raises(ModelDirError, match=r"thing ids \[2, 2\] must be distinct class indices in 0 \.\. 4"):
        load_model(five_class_pkl, class_names=NAMES, thing_ids=[2, 2])


def test_thing_ids_are_refused_where_the_checkpoint_records_the_split(tiny_model_dir):
    with pytest.raises(ModelDirError, match="thing ids are taken only for checkpoints that do not record"):
        load_model(tiny_model_dir, thing_ids=[0])


def test_command_line_takes_names_from_a_file_and_fails_in_one_line_without(five_class_pkl, tmp_path, capsys):
    arguments = ["segment", str(IMAGE), "--model", str(five_class_pkl), "--quiet", "--task", "semantic"]
    assert main(arguments + ["--output", str(tmp_path / "without")]) == 1
    error = capsys.readouterr().err
    assert "model_final_five.pkl records no class names" in error and "--classes FILE" in error
    assert len(error.strip().splitlines()) == 1
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    assert main(arguments + ["--output", str(tmp_path / "with"), "--classes", str(classes),
                             "--thing-ids", "4,2"]) == 0
    document = json.loads((tmp_path / "with" / f"{IMAGE.stem}.json").read_text())
    assert document["segments"] and {segment["label"] for segment in document["segments"]} <= set(NAMES)
    assert main(arguments + ["--output", str(tmp_path / "missing"), "--classes", str(tmp_path / "none.txt")]) == 1
    assert "--classes" in capsys.readouterr().err


def test_easycv_export_without_names_of_an_unknown_class_set_asks_for_them(tmp_path):
    config = Mask2FormerConfig(backbone=ResNetConfig(depth=18), num_things_classes=3, num_stuff_classes=2,
                               num_queries=10, hidden_dim=32, num_heads=4, encoder_layers=1, encoder_feedforward_dim=32,
                               decoder_layers=1, decoder_feedforward_dim=32, source="easycv")
    network = build_mask2former(config).eval()
    weights = {re.sub(r"^pixel_decoder\.", "head.pixel_decoder.", re.sub(r"^transformer_decoder\.", "head.predictor.",
                                                                         key)): value
               for key, value in network.state_dict().items()}
    head = {"num_things_classes": 3, "num_stuff_classes": 2,
            "pixel_decoder": {"conv_dim": 32, "transformer_enc_layers": 1, "transformer_dim_feedforward": 32},
            "transformer_decoder": {"num_queries": 10, "hidden_dim": 32, "nheads": 4, "dec_layers": 1,
                                    "dim_feedforward": 32}}
    export = tmp_path / "mask2former_export.pth"
    torch.save({"state_dict": weights, "meta": {"config": {"model": {
        "type": "Mask2Former", "backbone": {"type": "ResNet", "depth": 18}, "head": head}}}}, export)
    with pytest.raises(ModelDirError, match=r"mask2former_export\.pth records no class names \(meta\.CLASSES\)"):
        load_model(export)
    loaded, _ = load_model(export, class_names=NAMES)
    assert loaded.class_names == tuple(NAMES) and loaded.num_things_classes == 3


def hf_folder_without_weights(folder, id2label):
    """A config.json that load_model reads up to the class names (the weights are never reached)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mask2former", "backbone_config": {"model_type": "swin", "embed_dim": 32, "depths": [2, 2, 2, 2],
                                                         "num_heads": [1, 2, 4, 8], "window_size": 7},
        "id2label": id2label, "num_queries": 10, "hidden_dim": 64, "num_attention_heads": 4, "encoder_layers": 2,
        "decoder_layers": 4, "dim_feedforward": 128}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_hugging_face_placeholder_labels_are_no_class_names(tmp_path):
    folder = hf_folder_without_weights(tmp_path / "hf", {str(index): f"LABEL_{index}" for index in range(3)})
    with pytest.raises(ModelDirError, match=r"config\.json names no classes .*LABEL_0.*class_names=.*--classes FILE"):
        load_model(folder)


def test_hugging_face_names_of_a_built_in_set_bring_its_split_and_ids():
    base = Mask2FormerConfig(num_things_classes=133, num_stuff_classes=0, source="hf", task="semantic")
    coco = name_classes(base, [category.name for category in COCO_PANOPTIC_CATEGORIES], None, "config.json")
    assert (coco.num_things_classes, coco.num_stuff_classes, coco.task) == (80, 53, "panoptic")
    assert coco.category_ids[79:81] == (90, 92)
    ade = name_classes(replace(base, num_things_classes=150), [name.upper() for name in ADE20K_CLASSES], None, "x")
    assert (ade.num_things_classes, ade.task, ade.category_ids[-1]) == (0, "semantic", 149)
    other = name_classes(replace(base, num_things_classes=2), ["a", "b"], "instance", "x")
    assert (other.num_things_classes, other.task, other.category_ids) == (2, "instance", (0, 1))
    with pytest.raises(ModelDirError, match="x: 1 class names for its 2 classes"):
        name_classes(replace(base, num_things_classes=2), ["a"], None, "x")


@pytest.mark.parametrize("num_classes, task", [(150, "panoptic"), (19, "instance")])
def test_a_panoptic_or_instance_task_of_ade20k_or_cityscapes_classes_puts_their_things_first(tmp_path, num_classes,
                                                                                              task):
    config = replace(resnet_config(), num_things_classes=num_classes, num_stuff_classes=0)
    torch.manual_seed(0)
    network = build_mask2former(config).eval()
    pkl = write_detectron2_pkl(tmp_path / f"model_final_{num_classes}.pkl", network, config)
    semantic_config, semantic = load_model(pkl)
    assert (semantic_config.task, semantic_config.num_things_classes) == ("semantic", 0)
    things_config, things = load_model(pkl, task=task)
    assert things_config.task == task
    if num_classes == 150:  # detectron2's ADE20K panoptic isthing flags: 100 things, 50 stuff
        assert (things_config.num_things_classes, things_config.num_stuff_classes) == (100, 50)
        assert things_config.class_names[:5] == ("bed", "window", "cabinet", "person", "door")
        assert things_config.class_names[99] == "flag" and things_config.class_names[100:105] == (
            "wall", "building", "sky", "floor", "tree")
    else:  # Cityscapes' eight instance classes
        assert things_config.class_names[:8] == ("person", "rider", "car", "truck", "bus", "train", "motorcycle",
                                                 "bicycle")
        assert things_config.class_names[8:] == ("road", "sidewalk", "building", "wall", "fence", "pole",
                                                 "traffic light", "traffic sign", "vegetation", "terrain", "sky")
    order = [semantic_config.class_names.index(name) for name in things_config.class_names] + [num_classes]
    assert things_config.category_ids == tuple(semantic_config.category_ids[index] for index in order[:-1])
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, reordered = semantic(images).class_logits, things(images).class_logits  # (1, Q, K + 1)
    torch.testing.assert_close(reordered, expected[..., order], rtol=1e-6, atol=1e-5)


def test_hugging_face_ade20k_names_are_recognised_in_their_label_files_spelling():
    from modelscope_plugin.data.categories import ADE20K_HF_CLASSES

    base = Mask2FormerConfig(num_things_classes=150, num_stuff_classes=0, source="hf", task="semantic")
    ade = name_classes(base, [name + " " if name == "bed" else name for name in ADE20K_HF_CLASSES], None, "x")
    assert (ade.num_things_classes, ade.task, ade.category_ids[:3]) == (0, "semantic", (0, 1, 2))
    assert ADE20K_HF_CLASSES[8] == "windowpane" and ADE20K_CLASSES[8] == "window"


def test_hugging_face_preprocessor_sizes_and_normalisation_are_read():
    base = PreprocessConfig(resize_backend="pil")
    read = preprocess_from_processor({"size": {"shortest_edge": 384, "longest_edge": 640}, "size_divisor": 64,
                                      "image_mean": [0.5, 0.25, 0.0], "image_std": [1.0, 0.5, 0.25]}, base, "p.json")
    assert (read.short_side, read.long_side_max, read.size_divisor) == (384, 640, 64)
    assert read.mean == (127.5, 63.75, 0.0) and read.std == (255.0, 127.5, 63.75) and read.divide_by_std
    assert preprocess_from_processor({}, base, "p.json") == base
    older = preprocess_from_processor({"size": 384, "max_size": 1333}, base, "p.json")
    assert (older.short_side, older.long_side_max) == (384, 1333)
    with pytest.raises(ModelDirError, match=r"p\.json: size = \[1, 2\] is neither a number nor an object"):
        preprocess_from_processor({"size": [1, 2]}, base, "p.json")


def test_hugging_face_oneformer_style_metadata_names_classes_and_things(tmp_path):
    from modelscope_plugin.errors import CheckpointError
    from modelscope_plugin.model_dirs.hf import named_classes

    placeholders = {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    metadata = {"metadata": {"class_names": ["wall", "cat", "dog"], "thing_ids": [1, 2], "0": "wall"}}
    assert named_classes({"id2label": placeholders}, metadata) == (("wall", "cat", "dog"), [1, 2])
    assert named_classes({"id2label": {"0": "cat", "1": "dog"}}, {}) == (("cat", "dog"), None)
    assert named_classes({"id2label": placeholders}, {}) == (None, None)
    # with the metadata the folder gets past its class names, to its (here empty) weights
    folder = hf_folder_without_weights(tmp_path / "hf", placeholders)
    (folder / "preprocessor_config.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(folder)


def test_training_from_a_checkpoint_without_names_takes_them_from_model_classes(five_class_pkl, tmp_path, capsys):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    from modelscope_plugin.data.synthetic import SceneConfig, write_dataset

    scenes = tmp_path / "scenes"
    small = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)
    write_dataset(scenes, "train", 2, seed=0, config=small)
    write_dataset(scenes, "val", 1, seed=1, config=small)
    arguments = ["train", "--data", str(scenes), "--model", str(five_class_pkl), "--epochs", "1", "--batch-size", "2",
                 "--image-size", "64", "--num-points", "64", "--workers", "0"]
    assert main(arguments + ["--work-dir", str(tmp_path / "without")]) == 1
    assert "records no class names" in capsys.readouterr().err
    classes = tmp_path / "model_classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    assert main(arguments + ["--work-dir", str(tmp_path / "work"), "--model-classes", str(classes)]) == 0
    written, _ = load_model(tmp_path / "work" / "input_model")
    assert written.class_names == tuple(NAMES)  # the checkpoint as it was given, before its head was replaced
    result = pipeline(Tasks.image_segmentation, model=str(tmp_path / "work" / "output"), device="cpu")(str(IMAGE))
    assert result["masks"] is not None


def test_training_from_a_checkpoint_without_things_writes_the_things_first(five_class_pkl, tmp_path):
    from modelscope.trainers import build_trainer

    from modelscope_plugin.data.datasets import as_ms_dataset
    from modelscope_plugin.data.synthetic import SceneConfig, SyntheticSplit, write_dataset
    from modelscope_plugin.errors import TrainingConfigError

    scenes = tmp_path / "scenes"
    write_dataset(scenes, "train", 2, seed=0, config=SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30,
                                                                 max_things=5))
    arguments = dict(model=str(five_class_pkl), train_dataset=as_ms_dataset(SyntheticSplit(scenes, "train")
                                                                             .panoptic_rows()),
                     work_dir=str(tmp_path / "work"), class_names=NAMES, thing_ids=[4, 2],
                     cfg_options={"train.max_epochs": 1})
    build_trainer("mask2former-segmentation", arguments)
    configuration = json.loads((tmp_path / "work" / "input_model" / "configuration.json").read_text())
    model_config = configuration["model"]["config"]
    # NAMES = road, tree, car, sky, person: classes 4 (person) and 2 (car) are the things, then the rest in order
    assert model_config["class_names"] == ["person", "car", "road", "tree", "sky"]
    assert (model_config["num_things_classes"], model_config["num_stuff_classes"]) == (2, 3)
    _, plain = load_model(five_class_pkl, class_names=NAMES)
    _, written = load_model(tmp_path / "work" / "input_model")
    head = "transformer_decoder.class_embed."
    plain_weights, written_weights = plain.state_dict(), written.state_dict()
    for name in ("weight", "bias"):
        original = plain_weights[head + name]
        by_hand = torch.stack([original[4], original[2], original[0], original[1], original[3], original[5]])
        assert torch.equal(written_weights[head + name], by_hand), name
        assert not torch.equal(written_weights[head + name], original)
    others = [key for key in plain_weights if not key.startswith(head)]
    assert [key for key in others if not torch.equal(plain_weights[key], written_weights[key])] == []
    # a model directory records its things: thing_ids are refused for it when the trainer is built
    with pytest.raises(TrainingConfigError, match="thing_ids is for checkpoints without a configuration.json"):
        build_trainer("mask2former-segmentation", dict(arguments, model=str(tmp_path / "work" / "input_model"),
                                                       class_names=None, work_dir=str(tmp_path / "other")))


def test_the_train_command_takes_thing_ids(five_class_pkl, tmp_path):
    from modelscope_plugin.data.synthetic import SceneConfig, write_dataset

    scenes = tmp_path / "scenes"
    small = SceneConfig(image_size=64, min_thing_size=10, max_thing_size=30, max_things=5)
    write_dataset(scenes, "train", 2, seed=0, config=small)
    write_dataset(scenes, "val", 1, seed=1, config=small)
    classes = tmp_path / "model_classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    assert main(["train", "--data", str(scenes), "--model", str(five_class_pkl), "--epochs", "1", "--batch-size", "2",
                 "--image-size", "64", "--num-points", "64", "--workers", "0", "--work-dir", str(tmp_path / "work"),
                 "--model-classes", str(classes), "--thing-ids", "4,2"]) == 0
    written, _ = load_model(tmp_path / "work" / "input_model")
    assert written.class_names == ("person", "car", "road", "tree", "sky")
    assert (written.num_things_classes, written.num_stuff_classes) == (2, 3)
