"""facebookresearch/Mask2Former model-zoo files (``model_final_*.pkl``): a plain pickle of numpy arrays with detectron2
names and no configuration. The files here are built by the tests in that exact layout (random weights); the
architecture load_model reads from them must be the one they were built from, and pipeline() must give the same
segments as a native directory holding the same weights."""
import pickle
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, shape_weights, tiny_config, write_native_model_dir
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from test_layouts_offline import small_resnet_config, to_detectron2_names

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.config import ResNetConfig, SwinConfig
from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES
from modelscope_plugin.errors import CheckpointError, ModelDirError
from modelscope_plugin.model_dirs.load import load_model
from modelscope_plugin.modeling.backbones.swin import relative_position_index

IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"


def write_detectron2_pkl(path, network, config):
    """``{"model": {detectron2 name: numpy array}, "__author__": ...}`` as the model zoo pickles it: the original
    Swin's relative-position index buffers and detectron2's pixel mean / std included, no BatchNorm counters."""
    model = {key: value.detach().numpy().copy() for key, value in to_detectron2_names(network.state_dict()).items()}
    if isinstance(config.backbone, SwinConfig):
        for key in [key for key in model if key.endswith("attn.relative_position_bias_table")]:
            model[key.replace("relative_position_bias_table", "relative_position_index")] = \
                relative_position_index(config.backbone.window_size).numpy()
    model["pixel_mean"] = np.array([123.675, 116.28, 103.53]).reshape(3, 1, 1)
    model["pixel_std"] = np.array([58.395, 57.12, 57.375]).reshape(3, 1, 1)
    model["criterion.empty_weight"] = np.ones(config.num_classes + 1, dtype=np.float32)
    with open(path, "wb") as handle:
        pickle.dump({"model": model, "__author__": "Bowen Cheng"}, handle)
    return path


def swin_config():
    return replace(tiny_config(), backbone=SwinConfig(embed_dim=32, depths=(2, 2, 3, 2), num_heads=(1, 2, 4, 8),
                                                      window_size=7, mlp_ratio=4.0, drop_path_rate=0.0))


def resnet_config():
    return replace(small_resnet_config(), backbone=ResNetConfig(depth=50), num_heads=2, decoder_layers=3)


def built(config, seed=0):
    torch.manual_seed(seed)
    network = build_mask2former(config).eval()
    shape_weights(network, seed=seed)
    return network


@pytest.mark.parametrize("make_config", [swin_config, resnet_config], ids=["swin", "resnet50"])
def test_architecture_is_read_from_the_weights(tmp_path, make_config):
    config = make_config()
    network = built(config)
    path = write_detectron2_pkl(tmp_path / "model_final_abc123.pkl", network, config)
    loaded_config, loaded = load_model(path)
    backbone = loaded_config.backbone
    if isinstance(config.backbone, SwinConfig):
        assert (backbone.embed_dim, backbone.depths, backbone.num_heads, backbone.window_size, backbone.patch_size,
                backbone.mlp_ratio) == (32, (2, 2, 3, 2), (1, 2, 4, 8), 7, 4, 4.0)
    else:
        assert (backbone.depth, backbone.width) == (50, 64)
    assert (loaded_config.num_queries, loaded_config.hidden_dim, loaded_config.num_heads, loaded_config.encoder_layers,
            loaded_config.encoder_feedforward_dim, loaded_config.decoder_layers, loaded_config.decoder_feedforward_dim) \
        == (config.num_queries, config.hidden_dim, config.num_heads, config.encoder_layers,
            config.encoder_feedforward_dim, config.decoder_layers, config.decoder_feedforward_dim)
    # 133 classes: COCO panoptic's names, ids, 80 things, the panoptic task and detectron2's COCO test size
    assert loaded_config.class_names == tuple(category.name for category in COCO_PANOPTIC_CATEGORIES)
    assert loaded_config.category_ids[-1] == 200 and loaded_config.num_things_classes == 80
    assert loaded_config.task == "panoptic"
    assert (loaded_config.preprocess.short_side, loaded_config.preprocess.long_side_max) == (800, 1333)
    for key, value in network.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, loaded.state_dict()[key]), key


def assert_same_segments(first, second):
    assert len(first["masks"]) == len(second["masks"]) >= 1
    assert first["labels"] == second["labels"] and first["category_ids"] == second["category_ids"]
    assert first["scores"] == pytest.approx(second["scores"], abs=1e-6)
    for mask, other in zip(first["masks"], second["masks"]):
        assert np.array_equal(mask, other)


def test_pkl_in_pipeline_equals_the_same_weights_in_a_native_directory(tmp_path):
    config = swin_config()
    network = built(config)
    path = write_detectron2_pkl(tmp_path / "model_final_94dc52.pkl", network, config)
    pkl_config, _ = load_model(path)
    native = write_native_model_dir(tmp_path / "native", pkl_config, network)
    from_pkl = pipeline(Tasks.image_segmentation, model=str(path), device="cpu")(str(IMAGE))
    from_native = pipeline(Tasks.image_segmentation, model=str(native), device="cpu")(str(IMAGE))
    assert_same_segments(from_pkl, from_native)
    assert "panoptic_seg" in from_pkl  # COCO panoptic's class count: the panoptic task by default


def test_class_count_of_no_built_in_set_needs_names_and_takes_them(tmp_path):
    config = replace(resnet_config(), num_things_classes=7, num_stuff_classes=0)
    network = built(config)
    path = write_detectron2_pkl(tmp_path / "model_final_custom.pkl", network, config)
    with pytest.raises(ModelDirError, match=r"model_final_custom\.pkl records no class names.*7 classes.*class_names"):
        load_model(path)
    names = [f"part {index}" for index in range(7)]
    with pytest.raises(ModelDirError, match="6 class names given for its 7 classes"):
        load_model(path, class_names=names[:6])
    loaded_config, _ = load_model(path, class_names=names)
    assert loaded_config.class_names == tuple(names) and loaded_config.task == "semantic"
    result = pipeline(Tasks.image_segmentation, model=str(path), device="cpu", class_names=names)(str(IMAGE))
    assert result["labels"] and set(result["labels"]) <= set(names)


def test_ade20k_class_count_answers_semantic_at_its_test_size(tmp_path):
    config = replace(resnet_config(), num_things_classes=150, num_stuff_classes=0)
    network = built(config)
    path = write_detectron2_pkl(tmp_path / "model_final_ade.pkl", network, config)
    loaded_config, _ = load_model(path)
    assert loaded_config.class_names[:3] == ("wall", "building", "sky") and loaded_config.class_names[-1] == "flag"
    assert loaded_config.task == "semantic" and loaded_config.num_things_classes == 0
    assert (loaded_config.preprocess.short_side, loaded_config.preprocess.long_side_max) == (512, 2048)


def test_pkl_with_a_missing_entry_names_it(tmp_path):
    config = resnet_config()
    network = built(config)
    path = write_detectron2_pkl(tmp_path / "model_final_cut.pkl", network, config)
    with open(path, "rb") as handle:
        checkpoint = pickle.load(handle)
    del checkpoint["model"]["sem_seg_head.predictor.query_feat.weight"]
    del checkpoint["model"]["sem_seg_head.pixel_decoder.layer_1.weight"]
    with open(path, "wb") as handle:
        pickle.dump(checkpoint, handle)
    with pytest.raises(CheckpointError, match="lacks 'sem_seg_head.predictor.query_feat.weight'"):
        load_model(path)
    checkpoint["model"]["sem_seg_head.predictor.query_feat.weight"] = np.zeros((20, 64), dtype=np.float32)
    with open(path, "wb") as handle:
        pickle.dump(checkpoint, handle)
    with pytest.raises(CheckpointError, match=re.escape("pixel_decoder.layer_1.weight")):
        load_model(path)


def test_model_from_pretrained_takes_the_pkl_and_its_class_names(tmp_path):
    from modelscope.models import Model

    config = replace(resnet_config(), num_things_classes=3, num_stuff_classes=0)
    network = built(config)
    path = write_detectron2_pkl(tmp_path / "model_final_three.pkl", network, config)
    model = Model.from_pretrained(str(path), class_names=["a", "b", "c"])
    assert type(model).__name__ == "SegmentationModel" and model.config.class_names == ("a", "b", "c")
    for key, value in network.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, model.network.state_dict()[key]), key
    with pytest.raises(ModelDirError, match="records no class names"):
        Model.from_pretrained(str(path))
