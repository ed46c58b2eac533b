"""Hugging Face ``Mask2FormerForUniversalSegmentation`` folders (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, read with ``weights_only``) ->
(Mask2FormerConfig, network with strictly loaded weights); the key table is ``checkpoints/hf.py``."""
import json
from pathlib import Path

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.checkpoints.hf import backbone_type, hf_to_detectron2
from modelscope_plugin.checkpoints.io import load_strict, read_checkpoint
from modelscope_plugin.checkpoints.keymaps import convert_detectron2
from modelscope_plugin.config import Mask2FormerConfig, PreprocessConfig, ResNetConfig, SwinConfig
from modelscope_plugin.errors import CheckpointError
from modelscope_plugin.model_dirs.configuration import check_config

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def config_from_hf(values: dict):
    """HF ``config.json`` (Mask2FormerConfig) -> this package's ``Mask2FormerConfig`` (detectron2 behaviour)."""
    source_backbone_type, backbone = backbone_type(values)
    if source_backbone_type == "swin":
        if backbone.get("use_absolute_embeddings"):
            raise CheckpointError("Swin absolute position embeddings are not supported")
        backbone_config = SwinConfig(embed_dim=backbone["embed_dim"], depths=tuple(backbone["depths"]),
                                     num_heads=tuple(backbone["num_heads"]), window_size=backbone["window_size"],
                                     patch_size=backbone.get("patch_size", 4), mlp_ratio=backbone.get("mlp_ratio", 4.0))
    else:
        depths = tuple(backbone["depths"])
        depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101}.get(depths)
        if depth is None:
            raise CheckpointError(f"ResNet depths {depths} are not ResNet-50/101")
        backbone_config = ResNetConfig(depth=depth)
    id2label = {int(key): value for key, value in values.get("id2label", {}).items()}
    class_names = tuple(id2label[index] for index in sorted(id2label))
    # HF's decoder_layers counts the prediction before the first layer (as detectron2's DEC_LAYERS)
    return Mask2FormerConfig(
        backbone=backbone_config, num_things_classes=len(class_names), num_stuff_classes=0,
        num_queries=values["num_queries"], hidden_dim=values["hidden_dim"], num_heads=values["num_attention_heads"],
        encoder_layers=values["encoder_layers"], encoder_feedforward_dim=values.get("encoder_feedforward_dim", 1024),
        decoder_layers=values["decoder_layers"] - 1, decoder_feedforward_dim=values["dim_feedforward"],
        class_names=class_names, category_ids=tuple(sorted(id2label)), source="hf", task="semantic",
        preprocess=PreprocessConfig(resize_backend="pil"),
    )


def read_hf_config(model_dir) -> dict:
    """A Hugging Face folder's ``config.json`` as a dict, or one ``CheckpointError`` naming the file and the reason."""
    config_path = Path(model_dir) / "config.json"
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
    if not isinstance(values, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, not {type(values).__name__}")
    return values


def load_hf_model_dir(model_dir):
    """(config, network) from a ``save_pretrained`` folder; weights strictly loaded."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    values = read_hf_config(model_dir)
    weights = next((model_dir / name for name in HF_WEIGHT_FILES if (model_dir / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{model_dir} has neither {' nor '.join(HF_WEIGHT_FILES)}")
    try:
        config = config_from_hf(values)
    except CheckpointError as error:
        raise type(error)(f"{config_path}: {error}") from error
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{config_path} lacks or mistypes a Mask2Former field ({type(error).__name__}: "
                              f"{error})") from error
    check_config(config, str(config_path))
    state_dict = convert_detectron2(hf_to_detectron2(read_checkpoint(weights), values))
    network = build_mask2former(config)
    load_strict(network, state_dict, checkpoint_name=str(weights))
    return config, network.eval()
