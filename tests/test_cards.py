"""Model cards: ModelScope's card format, ``card validate``, and each card's python example run as written against a
local ModelScope cache holding random-weight directories in the published hub layouts (mmdet for the Swin-L ids,
EasyCV for the R50 id), with the network blocked."""
import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, shape_weights, tiny_config
from test_layouts_offline import small_resnet_config

from modelscope_plugin.apps import cards
from modelscope_plugin.apps.cli import main
from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints.keymaps import swin_to_unfold_order
from modelscope_plugin.config import Mask2FormerConfig
from modelscope_plugin.data.categories import MMDET_COCO_PANOPTIC_CLASSES
from modelscope_plugin.modeling.backbones.swin import relative_position_index

CARDS = REPO / "model_cards" / "damo"
MASK2FORMER_CARDS = ["cv_swinL_panoptic-segmentation_cocopan", "cv_swinL_semantic-segmentation_cocopanmerge",
                     "cv_r50_panoptic-segmentation_cocopan"]
FASTINST_CARD = "cv_resnet50_fast-instance-segmentation_coco"

# native name -> mmdet 2.x name; written independently of checkpoint.py's forward tables (inverse direction)
TO_MMDET = [
    (r"^backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.(qkv|proj|relative_position_bias_table)", r"backbone.stages.\1.blocks.\2.attn.w_msa.\3"),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.stages.\1.blocks.\2.ffn.layers.0.0."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.stages.\1.blocks.\2.ffn.layers.1."),
    (r"^backbone\.layers\.", "backbone.stages."),
    (r"^pixel_decoder\.input_proj\.(\d+)\.0\.", r"panoptic_head.pixel_decoder.input_convs.\1.conv."),
    (r"^pixel_decoder\.input_proj\.(\d+)\.1\.", r"panoptic_head.pixel_decoder.input_convs.\1.gn."),
    (r"^pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"panoptic_head.pixel_decoder.encoder.layers.\1.attentions.0."),
    (r"^pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear1\.", r"panoptic_head.pixel_decoder.encoder.layers.\1.ffns.0.layers.0.0."),
    (r"^pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear2\.", r"panoptic_head.pixel_decoder.encoder.layers.\1.ffns.0.layers.1."),
    (r"^pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm1\.", r"panoptic_head.pixel_decoder.encoder.layers.\1.norms.0."),
    (r"^pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm2\.", r"panoptic_head.pixel_decoder.encoder.layers.\1.norms.1."),
    (r"^pixel_decoder\.transformer\.level_embed$", "panoptic_head.pixel_decoder.level_encoding.weight"),
    (r"^pixel_decoder\.adapter_1\.norm\.", "panoptic_head.pixel_decoder.lateral_convs.0.gn."),
    (r"^pixel_decoder\.adapter_1\.", "panoptic_head.pixel_decoder.lateral_convs.0.conv."),
    (r"^pixel_decoder\.layer_1\.norm\.", "panoptic_head.pixel_decoder.output_convs.0.gn."),
    (r"^pixel_decoder\.layer_1\.", "panoptic_head.pixel_decoder.output_convs.0.conv."),
    (r"^pixel_decoder\.mask_features\.", "panoptic_head.pixel_decoder.mask_feature."),
    (r"^transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"panoptic_head.transformer_decoder.layers.\1.attentions.0.attn."),
    (r"^transformer_decoder\.transformer_self_attention_layers\.(\d+)\.self_attn\.", r"panoptic_head.transformer_decoder.layers.\1.attentions.1.attn."),
    (r"^transformer_decoder\.transformer_cross_attention_layers\.(\d+)\.norm\.", r"panoptic_head.transformer_decoder.layers.\1.norms.0."),
    (r"^transformer_decoder\.transformer_self_attention_layers\.(\d+)\.norm\.", r"panoptic_head.transformer_decoder.layers.\1.norms.1."),
    (r"^transformer_decoder\.transformer_ffn_layers\.(\d+)\.norm\.", r"panoptic_head.transformer_decoder.layers.\1.norms.2."),
    (r"^transformer_decoder\.transformer_ffn_layers\.(\d+)\.linear1\.", r"panoptic_head.transformer_decoder.layers.\1.ffns.0.layers.0.0."),
    (r"^transformer_decoder\.transformer_ffn_layers\.(\d+)\.linear2\.", r"panoptic_head.transformer_decoder.layers.\1.ffns.0.layers.1."),
    (r"^transformer_decoder\.decoder_norm\.", "panoptic_head.transformer_decoder.post_norm."),
    (r"^transformer_decoder\.input_proj\.", "panoptic_head.decoder_input_projs."),
    (r"^transformer_decoder\.class_embed\.", "panoptic_head.cls_embed."),
    (r"^transformer_decoder\.mask_embed\.layers\.(\d)\.", lambda match: f"panoptic_head.mask_embed.{2 * int(match[1])}."),
    (r"^transformer_decoder\.(query_embed|query_feat|level_embed)\.", r"panoptic_head.\1."),
]


def to_mmdet_layout(state_dict):
    converted = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in TO_MMDET:
            if re.match(pattern, key):
                new_key = re.sub(pattern, replacement, key, count=1)
                break
        if re.match(r"^backbone\.stages\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", new_key):
            value = swin_to_unfold_order(value, dim=1 if new_key.endswith("reduction.weight") else 0)
        converted[new_key] = value
        match = re.match(r"^(backbone\.stages\.\d+\.blocks\.\d+\.attn\.w_msa\.)relative_position_bias_table$", new_key)
        if match:  # mmdet saves the index buffer as well
            converted[match[1] + "relative_position_index"] = relative_position_index(int((value.shape[0] ** 0.5 + 1) / 2))
    return converted


def mmdet_config_text(config, semantic: bool) -> str:
    """An mmdet 2.x config (as the Swin-L ids publish) for ``config``'s dimensions."""
    backbone = config.backbone
    lines = [
        "num_things_classes = 80", "num_stuff_classes = 53", "num_classes = num_things_classes + num_stuff_classes",
        "model = dict(type='Mask2Former',",
        f"    backbone=dict(type='SwinTransformer', embed_dims={backbone.embed_dim}, depths={list(backbone.depths)},",
        f"                  num_heads={list(backbone.num_heads)}, window_size={backbone.window_size}, mlp_ratio=4, patch_size=4),",
        f"    panoptic_head=dict(type='Mask2FormerHead', feat_channels={config.hidden_dim}, out_channels={config.hidden_dim},",
        f"        num_things_classes=num_things_classes, num_stuff_classes=num_stuff_classes, num_queries={config.num_queries},",
        f"        pixel_decoder=dict(type='MSDeformAttnPixelDecoder', encoder=dict(num_layers={config.encoder_layers},",
        f"            transformerlayers=dict(attn_cfgs=dict(num_heads={config.num_heads}),",
        f"                                   ffn_cfgs=dict(feedforward_channels={config.encoder_feedforward_dim})))),",
        f"        transformer_decoder=dict(num_layers={config.decoder_layers},",
        f"            transformerlayers=dict(attn_cfgs=dict(num_heads={config.num_heads}),",
        f"                                   ffn_cfgs=dict(feedforward_channels={config.decoder_feedforward_dim})))),",
        "    test_cfg=dict(panoptic_on=True, max_per_image=100, iou_thr=0.8, filter_low_score=True))",
        "test_pipeline = [dict(type='LoadImageFromFile'), dict(type='MultiScaleFlipAug', img_scale=(1333, 800), flip=False,",
        "    transforms=[dict(type='Resize', keep_ratio=True), dict(type='RandomFlip'),",
        "                dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),",
        "                dict(type='Pad', size_divisor=32), dict(type='ImageToTensor', keys=['img']), dict(type='Collect', keys=['img'])])]",
        "data = dict(test=dict(pipeline=test_pipeline))",
    ]
    if semantic:
        lines += [f"CLASSES = {list(MMDET_COCO_PANOPTIC_CLASSES)!r}",
                  "PALETTE = [[(index * 37) % 256, (index * 91) % 256, (index * 53) % 256] for index in range(133)]"]
    return "\n".join(lines) + "\n"


def easycv_configuration(config: Mask2FormerConfig) -> dict:
    """EasyCV's ``to_ms_config`` configuration.json (tuples encoded as {"__class__": "tuple", ...})."""
    tuple_of = lambda *values: {"__class__": "tuple", "__value__": list(values)}
    card = json.loads((CARDS / "cv_r50_panoptic-segmentation_cocopan" / "configuration.json").read_text())
    card["model"].update({
        "backbone": {"type": "ResNet", "depth": 50},
        "head": {"num_things_classes": 80, "num_stuff_classes": 53,
                 "pixel_decoder": {"conv_dim": config.hidden_dim, "mask_dim": config.hidden_dim, "transformer_enc_layers": config.encoder_layers,
                                   "transformer_dim_feedforward": config.encoder_feedforward_dim, "transformer_nheads": config.num_heads},
                 "transformer_decoder": {"hidden_dim": config.hidden_dim, "num_queries": config.num_queries, "nheads": config.num_heads,
                                         "dim_feedforward": config.decoder_feedforward_dim, "dec_layers": config.decoder_layers,
                                         "mask_dim": config.hidden_dim}},
        "test_cfg": {"panoptic_on": True, "max_per_image": 100, "filter_low_score": True}})
    card["dataset"] = {"val": {"pipeline": [{"type": "MMMultiScaleFlipAug", "img_scale": tuple_of(1333, 800), "flip": False, "transforms": [
        {"type": "MMResize", "keep_ratio": True},
        {"type": "MMNormalize", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True},
        {"type": "MMPad", "size_divisor": 32}]}]}}
    return card


def write_hub_dir(name: str, directory: Path) -> dict:
    """A random-weight model directory in ``name``'s published layout; returns the source network's state dict."""
    torch.manual_seed(0)
    directory.mkdir(parents=True)
    if name.startswith("cv_swinL"):
        config = tiny_config()
        network = build_mask2former(config).eval()
        shape_weights(network)
        shutil.copy(CARDS / name / "configuration.json", directory / "configuration.json")
        semantic = "semantic" in name
        (directory / ("mmcv_config.py" if semantic else "config.py")).write_text(mmdet_config_text(config, semantic))
        meta = {} if semantic else {"CLASSES": list(MMDET_COCO_PANOPTIC_CLASSES)}
        torch.save({"state_dict": to_mmdet_layout(network.state_dict()), "meta": meta}, directory / "pytorch_model.pt")
    else:
        config = small_resnet_config()
        network = build_mask2former(config).eval()
        shape_weights(network)
        (directory / "configuration.json").write_text(json.dumps(easycv_configuration(config)))
        state_dict = {re.sub(r"^pixel_decoder\.", "head.pixel_decoder.", re.sub(r"^transformer_decoder\.", "head.predictor.", key)): value
                      for key, value in network.state_dict().items()}
        torch.save({"state_dict": state_dict, "meta": {"easycv_version": "0.11.7"}}, directory / "epoch_50.pt")
    return network.state_dict()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """MODELSCOPE_CACHE holding every Mask2Former card id (damo owner), and each source network's weights."""
    cache = tmp_path_factory.mktemp("modelscope_cache")
    sources = {name: write_hub_dir(name, cache / "models" / f"damo--{name}" / "snapshots" / "master") for name in MASK2FORMER_CARDS}
    return cache, sources


@pytest.mark.parametrize("name", MASK2FORMER_CARDS)
def test_hub_layout_directories_load_the_source_weights(hub_cache, name):
    """The layouts the card examples run on are faithful: the loaded network holds the source network's weights."""
    from modelscope_plugin.model_dirs.load import load_model_dir

    cache, sources = hub_cache
    config, network = load_model_dir(cache / "models" / f"damo--{name}" / "snapshots" / "master")
    for key, value in sources[name].items():
        if not key.endswith(("num_batches_tracked", "relative_position_index")):
            assert torch.equal(network.state_dict()[key], value), key
    assert config.task == ("semantic" if "semantic" in name else "panoptic") and len(config.class_names) == 133


@pytest.mark.parametrize("name", MASK2FORMER_CARDS + [FASTINST_CARD])
def test_card_front_matter_and_sections(name):
    readme = CARDS / name / "README.md"
    front = cards.read_front_matter(readme)
    assert front["tasks"] == ["image-segmentation"] and front["frameworks"] == ["pytorch"]
    for field in cards.REQUIRED_FRONT_MATTER:
        assert front.get(field), f"{name}: {field}"
    text = readme.read_text()
    for section in ("## Usage", "## Preprocessing", "## Metrics", "## Limitations", "## Citation"):
        assert section in text, f"{name}: {section}"
    assert len(cards.python_examples(readme)) >= 1


def test_published_metrics_are_attributed_to_the_original_implementation():
    panoptic = (CARDS / "cv_swinL_panoptic-segmentation_cocopan" / "README.md").read_text()
    assert "57.8" in panoptic and "Cheng et al. 2022" in panoptic and "57.6" in panoptic and "mmdetection" in panoptic
    assert "51.64" in (CARDS / "cv_r50_panoptic-segmentation_cocopan" / "README.md").read_text()
    assert "67.4" in (CARDS / "cv_swinL_semantic-segmentation_cocopanmerge" / "README.md").read_text()
    for name in MASK2FORMER_CARDS:
        assert "not re-measured here" in (CARDS / name / "README.md").read_text()


@pytest.mark.parametrize("name", MASK2FORMER_CARDS)
def test_card_validate_accepts_the_cards(hub_cache, name, capsys):
    cache, _ = hub_cache
    assert main(["card", "validate", str(CARDS / name)]) == 0, capsys.readouterr().err
    weights = cache / "models" / f"damo--{name}" / "snapshots" / "master"
    assert cards.validate_card(CARDS / name, weights) == []


def test_card_validate_lists_every_problem(tiny_model_dir, tmp_path, capsys):
    card = tmp_path / "someone" / "bad-card"
    shutil.copytree(CARDS / "cv_swinL_panoptic-segmentation_cocopan", card)
    readme = card / "README.md"
    readme.write_text(readme.read_text().replace("metrics:\n- PQ\n", "").replace("- pytorch\n", "- tensorflow\n"))
    configuration = json.loads((card / "configuration.json").read_text())
    configuration.update(plugins=["some-unknown-plugin"], model={"type": "vitadapter-semantic-segmentation"})
    (card / "configuration.json").write_text(json.dumps(configuration))
    mismatched = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, mismatched)
    values = json.loads((mismatched / "configuration.json").read_text())
    values["model"]["config"]["num_queries"] = 7
    (mismatched / "configuration.json").write_text(json.dumps(values))
    assert main(["card", "validate", str(card), "--weights", str(mismatched)]) == 1
    error = capsys.readouterr().err
    for fragment in ("lacks 'metrics'", "frameworks ['tensorflow']", "'vitadapter-semantic-segmentation' is not a model type",
                     "some-unknown-plugin", "does not load", "query_feat.weight"):
        assert fragment in error, fragment
    readme.write_text("# no front matter\n")
    (card / "configuration.json").write_text("{broken")
    problems = cards.validate_card(card)
    assert any("no front matter" in problem for problem in problems) and any("not valid JSON" in problem for problem in problems)
    assert any("no ```python usage example" in problem for problem in problems)
    assert cards.validate_card(tmp_path / "absent") == [f"card folder {tmp_path / 'absent'} does not exist"]


def run_card_example(name: str, cache: Path, workdir: Path, monkeypatch) -> dict:
    """Runs the card's python blocks as written (in ``workdir``, which holds image.jpg) with the network blocked."""
    return run_card_example_in(CARDS / name, cache, workdir, monkeypatch)


def run_card_example_in(card_dir: Path, cache: Path, workdir: Path, monkeypatch) -> dict:
    """``run_card_example`` for the card folder ``card_dir``."""
    import modelscope_hub.config

    from modelscope_plugin.integration import hub

    # modelscope_hub keeps one process-wide config holding MODELSCOPE_CACHE as it was when first used; start afresh
    # (monkeypatch puts the previous one back afterwards)
    monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    shutil.copy(SHARED_DATA / "coco" / "val2017" / "000000142238.jpg", workdir / "image.jpg")
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.chdir(workdir)
    hub.resolve_model_dir.cache_clear()

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    namespace: dict = {}
    for code in cards.python_examples(card_dir / "README.md"):
        exec(compile(code, f"{card_dir.name}/README.md", "exec"), namespace)
    hub.resolve_model_dir.cache_clear()
    return namespace


@pytest.mark.parametrize("name", MASK2FORMER_CARDS)
def test_card_example_runs_as_written(hub_cache, name, tmp_path, monkeypatch, capsys):
    cache, _ = hub_cache
    namespace = run_card_example(name, cache, tmp_path, monkeypatch)
    result = namespace["result"]
    assert len(result["masks"]) >= 2 and all(mask.shape == (427, 640) for mask in result["masks"])
    printed = capsys.readouterr().out
    assert str(result["labels"]) in printed
    drawn = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "result.jpg"))
    assert drawn.shape[:2] == (427, 640) and drawn.std() > 10  # coloured segments, not a blank image
    expected_key = "sem_seg" if "semantic" in name else "panoptic_seg"
    assert expected_key in result


def test_fastinst_card_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from test_cli import write_small_fastinst_dir

    cache = tmp_path / "cache"
    model_dir = write_small_fastinst_dir(cache / "models" / f"damo--{FASTINST_CARD}" / "snapshots" / "master")
    assert cards.validate_card(CARDS / FASTINST_CARD, model_dir) == []
    namespace = run_card_example(FASTINST_CARD, cache, tmp_path, monkeypatch)
    result, everything = namespace["result"], namespace["everything"]
    # random weights: few (here no) instances reach the default score_thr 0.5, so the shapes are checked on the
    # example's score_thr=0 call, and the default call must return exactly its instances scoring >= 0.5
    assert len(everything["masks"]) > 0 and all(mask.shape == (427, 640) for mask in everything["masks"])
    assert result["scores"] == [score for score in everything["scores"] if score >= 0.5]
    assert result["labels"] == [label for label, score in zip(everything["labels"], everything["scores"]) if score >= 0.5]
    assert str(result["labels"]) in capsys.readouterr().out


EOMT_CARD = REPO / "model_cards" / "tue-mps" / "coco_panoptic_eomt_large_640"


@pytest.mark.oracle
def test_eomt_card_validates_and_its_example_runs_as_written(tmp_path, monkeypatch, capsys):
    """The EoMT card: ModelScope's card format, ``card validate`` with a random-weight Hugging Face EoMT folder of
    133 classes (written by transformers in the oracle environment) as its weights, and its example run as written
    on that folder with this card's configuration.json beside it. Four queries: with more, random masks overlap so
    much that no segment passes the 0.8 overlap rule."""
    from conftest import run_oracle

    front = cards.read_front_matter(EOMT_CARD / "README.md")
    assert front["tasks"] == ["image-segmentation"] and front["frameworks"] == ["pytorch"]
    text = (EOMT_CARD / "README.md").read_text()
    for section in ("## Usage", "## Preprocessing", "## Metrics", "## Limitations", "## Citation"):
        assert section in text, section
    assert "56.0" in text and "Kerssies et al. 2025" in text and "not re-measured here" in text
    workdir = tmp_path / "work"
    model_dir = workdir / "coco_panoptic_eomt_large_640"
    run_oracle("eomt_oracle.py", "make", "--hidden-size", "64", "--layers", "4", "--heads", "4", "--image-size", "64",
               "--registers", "2", "--num-blocks", "2", "--queries", "4", "--labels", "133", "--seed", "0",
               "--attn-mask-probs", "0,0", "--out-dir", model_dir)
    assert main(["card", "validate", str(EOMT_CARD), "--weights", str(model_dir)]) == 0, capsys.readouterr().err
    assert cards.validate_card(EOMT_CARD, model_dir) == []
    # weights that do not load are a problem validate names
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert any("does not load" in problem for problem in cards.validate_card(EOMT_CARD, broken))
    shutil.copy(EOMT_CARD / "configuration.json", model_dir / "configuration.json")
    namespace = run_card_example_in(EOMT_CARD, tmp_path / "cache", workdir, monkeypatch)
    result = namespace["result"]
    assert "panoptic_seg" in result and result["masks"]
    assert all(mask.shape == (427, 640) for mask in result["masks"])
    assert str(result["labels"]) in capsys.readouterr().out
    drawn = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(workdir / "result.jpg"))
    assert drawn.shape[:2] == (427, 640)
