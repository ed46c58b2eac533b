"""Checkpoint reading and key maps: one explicit table per source, strict loading, no pickled code.

This project's parameter names follow detectron2's Mask2Former (``pixel_decoder.*``, with its
``sem_seg_head.predictor.*`` as ``transformer_decoder.*``), the original Swin release for Swin backbones and
torchvision for ResNet. Each source layout is converted to those names by a table of regular expressions;
tensors whose layout differs (mmdet's ``nn.Unfold`` patch merging) are permuted, not just renamed.
"""
import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .modeling.backbones.swin import relative_position_index


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, is refused, or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------------------
# Reading files without executing pickled code


class ConfigDictStandIn(dict):
    """Stands in for mmcv's ``ConfigDict`` (an ``addict.Dict``) pickled in EasyCV export files; holds plain data."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray

# globals a supported checkpoint may reference, mapped to the harmless object that rebuilds it
_NUMPY_GLOBALS = {
    "numpy.core.multiarray._reconstruct": _multiarray._reconstruct,
    "numpy._core.multiarray._reconstruct": _multiarray._reconstruct,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy.core.multiarray.scalar": _multiarray.scalar,
    "numpy._core.multiarray.scalar": _multiarray.scalar,
}
_STAND_IN_GLOBALS = {
    "mmcv.utils.config.ConfigDict": ConfigDictStandIn,
    "addict.addict.Dict": ConfigDictStandIn,
    "collections.OrderedDict": dict,
}


_TORCH_REBUILD_GLOBALS = {
    f"torch._utils.{name}" for name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter")
} | {f"torch.{kind}Storage" for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits numpy arrays/dtypes/scalars, plain containers, torch's tensor rebuilders and the ConfigDict
    stand-in; refuses any other global."""

    def find_class(self, module: str, name: str):
        full_name = f"{module}.{name}"
        if full_name == "collections.OrderedDict":
            import collections

            return collections.OrderedDict
        if full_name in _TORCH_REBUILD_GLOBALS:
            return super().find_class(module, name)
        if full_name in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[full_name]
        if full_name in _STAND_IN_GLOBALS:
            return _STAND_IN_GLOBALS[full_name]
        if module.startswith("numpy") and name in {"float64", "float32", "int64", "int32", "uint8", "bool_", "dtype"}:
            return getattr(np, name)
        raise CheckpointError(f"refusing to unpickle {full_name}: not a known-safe type for a checkpoint")


class _restricted_pickle_module:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler is the restricted one."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load())
    __name__ = "restricted_pickle"


def _torch_safe_globals() -> List:
    safe = [(_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            (_multiarray.scalar, "numpy.core.multiarray.scalar"),
            (ConfigDictStandIn, "mmcv.utils.config.ConfigDict"), (ConfigDictStandIn, "addict.addict.Dict")]
    safe += [type(np.dtype(name)) for name in ("float32", "float64", "int64", "int32", "uint8", "bool")]
    return safe


def read_checkpoint(path) -> dict:
    """Reads a .pt/.pth (torch zip or legacy pickle), .pkl (detectron2 release) or .safetensors file.

    Nothing in the file is executed: torch files load with ``weights_only=True`` (plus stand-ins for the
    numpy and mmcv types these formats contain), plain pickles through a restricted unpickler.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError for truncated/corrupt files
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {error}") from error
    if zipfile.is_zipfile(path) or path.suffix in (".pt", ".pth", ".bin"):
        try:
            with torch.serialization.safe_globals(_torch_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if zipfile.is_zipfile(path):
                # torch's weights-only unpickler cannot fill dict subclasses such as the pickled mmcv ConfigDict of
                # EasyCV exports; the restricted unpickler can, and still refuses any global not listed above
                try:
                    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module)
                except CheckpointError as refusal:
                    raise CheckpointError(f"refusing to load {path}: {refusal}") from error
        except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {error}") from error
    # a plain pickle (detectron2 .pkl releases hold numpy arrays under "model")
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(io.BufferedReader(handle), encoding="latin1").load()
    except CheckpointError as error:
        raise CheckpointError(f"refusing to load {path}: {error}") from error
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {error}") from error


def to_tensors(state_dict: Mapping) -> Dict[str, torch.Tensor]:
    """numpy arrays (detectron2 .pkl) become tensors; tensors pass through."""
    tensors = {}
    for key, value in state_dict.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key] = value
    return tensors


# ----------------------------------------------------------------------------------------------------------------------
# Key maps. Each rule is (pattern, replacement); the first matching rule renames a key; keys matching no rule
# are kept as they are (and strict loading then names them if the model lacks them).

Rule = Tuple[str, str]


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Rule]) -> Dict[str, torch.Tensor]:
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in compiled:
            if pattern.match(key):
                new_key = pattern.sub(replacement, key, count=1)
                break
        if new_key in renamed:
            raise CheckpointError(f"two checkpoint entries map to {new_key!r}")
        renamed[new_key] = value
    return renamed


MMDET_SWIN_RULES: List[Rule] = [
    (r"^backbone\.patch_embed\.projection\.", r"backbone.patch_embed.proj."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.", r"backbone.layers.\1.blocks.\2.attn."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.", r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (r"^backbone\.stages\.", r"backbone.layers."),
]

MMDET_HEAD_RULES: List[Rule] = [
    (r"^panoptic_head\.pixel_decoder\.input_convs\.(\d+)\.conv\.", r"pixel_decoder.input_proj.\1.0."),
    (r"^panoptic_head\.pixel_decoder\.input_convs\.(\d+)\.gn\.", r"pixel_decoder.input_proj.\1.1."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.attentions\.0\.", r"pixel_decoder.transformer.encoder.layers.\1.self_attn."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"pixel_decoder.transformer.encoder.layers.\1.linear1."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"pixel_decoder.transformer.encoder.layers.\1.linear2."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.norms\.0\.", r"pixel_decoder.transformer.encoder.layers.\1.norm1."),
    (r"^panoptic_head\.pixel_decoder\.encoder\.layers\.(\d+)\.norms\.1\.", r"pixel_decoder.transformer.encoder.layers.\1.norm2."),
    (r"^panoptic_head\.pixel_decoder\.level_encoding\.weight$", r"pixel_decoder.transformer.level_embed"),
    # mmdet builds its FPN convs coarse to fine, detectron2 names them fine to coarse from 1; the releases have one
    (r"^panoptic_head\.pixel_decoder\.lateral_convs\.0\.conv\.", r"pixel_decoder.adapter_1."),
    (r"^panoptic_head\.pixel_decoder\.lateral_convs\.0\.gn\.", r"pixel_decoder.adapter_1.norm."),
    (r"^panoptic_head\.pixel_decoder\.output_convs\.0\.conv\.", r"pixel_decoder.layer_1."),
    (r"^panoptic_head\.pixel_decoder\.output_convs\.0\.gn\.", r"pixel_decoder.layer_1.norm."),
    (r"^panoptic_head\.pixel_decoder\.mask_feature\.", r"pixel_decoder.mask_features."),
    # decoder layer operation order: cross_attn, norm, self_attn, norm, ffn, norm
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"transformer_decoder.transformer_cross_attention_layers.\1.multihead_attn."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.attentions\.1\.attn\.", r"transformer_decoder.transformer_self_attention_layers.\1.self_attn."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.0\.", r"transformer_decoder.transformer_cross_attention_layers.\1.norm."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.1\.", r"transformer_decoder.transformer_self_attention_layers.\1.norm."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.norms\.2\.", r"transformer_decoder.transformer_ffn_layers.\1.norm."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"transformer_decoder.transformer_ffn_layers.\1.linear1."),
    (r"^panoptic_head\.transformer_decoder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"transformer_decoder.transformer_ffn_layers.\1.linear2."),
    (r"^panoptic_head\.transformer_decoder\.post_norm\.", r"transformer_decoder.decoder_norm."),
    (r"^panoptic_head\.decoder_input_projs\.", r"transformer_decoder.input_proj."),
    (r"^panoptic_head\.cls_embed\.", r"transformer_decoder.class_embed."),
    (r"^panoptic_head\.mask_embed\.0\.", r"transformer_decoder.mask_embed.layers.0."),
    (r"^panoptic_head\.mask_embed\.2\.", r"transformer_decoder.mask_embed.layers.1."),
    (r"^panoptic_head\.mask_embed\.4\.", r"transformer_decoder.mask_embed.layers.2."),
    (r"^panoptic_head\.(query_embed|query_feat|level_embed)\.", r"transformer_decoder.\1."),
]

EASYCV_RULES: List[Rule] = [
    (r"^head\.pixel_decoder\.", r"pixel_decoder."),
    (r"^head\.predictor\.", r"transformer_decoder."),
]

DETECTRON2_RULES: List[Rule] = [
    (r"^sem_seg_head\.pixel_decoder\.", r"pixel_decoder."),
    (r"^sem_seg_head\.predictor\.", r"transformer_decoder."),
    # detectron2 ResNet -> torchvision ResNet
    (r"^backbone\.stem\.conv1\.norm\.", r"backbone.bn1."),
    (r"^backbone\.stem\.conv1\.", r"backbone.conv1."),
    (r"^backbone\.res(\d)\.(\d+)\.shortcut\.norm\.", lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.downsample.1."),
    (r"^backbone\.res(\d)\.(\d+)\.shortcut\.", lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.downsample.0."),
    (r"^backbone\.res(\d)\.(\d+)\.conv(\d)\.norm\.", lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.bn{match.group(3)}."),
    (r"^backbone\.res(\d)\.(\d+)\.conv(\d)\.", lambda match: f"backbone.layer{int(match.group(1)) - 1}.{match.group(2)}.conv{match.group(3)}."),
]

# entries the sources save that carry no weights of this model
_NON_WEIGHT_KEYS = re.compile(
    r"(relative_position_index$|^criterion\.|^__drop__\.|\.pe_layer\.|^pixel_mean$|^pixel_std$|^data_preprocessor\.)"
)


def unfold_to_swin_order(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """mmdet's ``nn.Unfold`` patch merging orders the 4C input channels channel-major (c*4 + k, k over
    (0,0), (0,1), (1,0), (1,1)); the original Swin concatenates neighbour-major (k*C + c, k over (0,0), (1,0), (0,1), (1,1)).
    ``dim`` is the axis of size 4C."""
    channels = weight.shape[dim] // 4
    moved = weight.movedim(dim, 0)
    # (C, 4 unfold positions, ...) -> (4 swin positions, C, ...)
    reordered = moved.reshape(channels, 4, *moved.shape[1:]).transpose(0, 1)[[0, 2, 1, 3]]
    return reordered.reshape(4 * channels, *moved.shape[1:]).movedim(0, dim).contiguous()


def swin_to_unfold_order(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of ``unfold_to_swin_order`` (used to write mmdet-layout checkpoints)."""
    channels = weight.shape[dim] // 4
    moved = weight.movedim(dim, 0)
    reordered = moved.reshape(4, channels, *moved.shape[1:])[[0, 2, 1, 3]].transpose(0, 1)
    return reordered.reshape(4 * channels, *moved.shape[1:]).movedim(0, dim).contiguous()


def check_relative_position_indices(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Saved Swin index buffers must equal the computed ones (a different convention would need a remap)."""
    for key, value in state_dict.items():
        if key.endswith("relative_position_index"):
            window_size = int(round(value.shape[0] ** 0.5))
            if not torch.equal(value.long(), relative_position_index(window_size)):
                raise CheckpointError(f"{key} differs from the standard Swin relative position index")


def convert_mmdet(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """mmdet 2.x ``Mask2Former`` detector (``backbone.*``, ``panoptic_head.*``) -> this project's names."""
    converted = rename_keys(state_dict, MMDET_SWIN_RULES + MMDET_HEAD_RULES)
    for key in list(converted):
        if re.match(r"^backbone\.layers\.\d+\.downsample\.reduction\.weight$", key):
            converted[key] = unfold_to_swin_order(converted[key], dim=1)
        elif re.match(r"^backbone\.layers\.\d+\.downsample\.norm\.(weight|bias)$", key):
            converted[key] = unfold_to_swin_order(converted[key], dim=0)
    return converted


def convert_easycv(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EasyCV ``Mask2Former`` (``backbone.*`` torchvision-style ResNet, ``head.pixel_decoder.*``, ``head.predictor.*``)."""
    return rename_keys(state_dict, EASYCV_RULES)


def convert_detectron2(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """facebookresearch/Mask2Former release (detectron2 names; Swin in the original layout)."""
    return rename_keys(state_dict, DETECTRON2_RULES)


def detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(key.startswith("panoptic_head.") for key in keys):
        return "mmdet"
    if any(key.startswith("head.predictor.") for key in keys):
        return "easycv"
    if any(key.startswith("sem_seg_head.") for key in keys):
        return "detectron2"
    if any(key.startswith("model.pixel_level_module.") for key in keys):
        return "hf"
    if any(key.startswith("transformer_decoder.") for key in keys):
        return "native"
    raise CheckpointError("unrecognised checkpoint layout (expected mmdet, EasyCV, detectron2, Hugging Face or native keys)")


CONVERTERS: Dict[str, Callable[[Mapping[str, torch.Tensor]], Dict[str, torch.Tensor]]] = {
    "mmdet": convert_mmdet,
    "easycv": convert_easycv,
    "detectron2": convert_detectron2,
    "native": dict,
}


def extract_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict (``state_dict`` for mmdet/EasyCV, ``model`` for detectron2), ``module.`` stripped."""
    for container_key in ("state_dict", "model"):
        if isinstance(checkpoint.get(container_key), Mapping):
            checkpoint = checkpoint[container_key]
            break
    state_dict = to_tensors(checkpoint)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def convert_to_native(state_dict: Mapping[str, torch.Tensor], source: Optional[str] = None) -> Dict[str, torch.Tensor]:
    source = source or detect_source(state_dict)
    if source == "hf":
        raise CheckpointError("Hugging Face checkpoints are loaded through load_hf_model_dir")
    if source not in CONVERTERS:
        raise CheckpointError(f"unknown checkpoint source {source!r}; expected one of {sorted(CONVERTERS)}")
    check_relative_position_indices(state_dict)
    converted = CONVERTERS[source](state_dict)
    return {key: value for key, value in converted.items() if not _NON_WEIGHT_KEYS.search(key)}


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], checkpoint_name: str = "checkpoint") -> None:
    """Loads every parameter and buffer or raises one ``CheckpointError`` naming all missing, unexpected and
    mis-shaped entries. BatchNorm counters (``num_batches_tracked``) that a source does not save are filled in."""
    expected = model.state_dict()
    state_dict = dict(state_dict)
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if state_dict[key].shape != expected[key].shape
    )
    if missing or unexpected or mis_shaped:
        def listing(title, names):
            if not names:
                return ""
            shown = "\n    ".join(names[:40]) + (f"\n    ... and {len(names) - 40} more" if len(names) > 40 else "")
            return f"\n  {title} ({len(names)}):\n    {shown}"

        raise CheckpointError(
            f"{checkpoint_name} does not match the model:"
            + listing("missing", missing) + listing("unexpected", unexpected) + listing("shape mismatch", mis_shaped)
        )
    model.load_state_dict(state_dict, strict=True)
