"""Reading checkpoint files without executing pickled code, and loading weights strictly.

``read_checkpoint`` takes torch files (``weights_only=True``), plain pickles (a restricted unpickler) and
safetensors; ``extract_state_dict`` finds the weights inside; ``load_strict`` loads them or names every missing,
unexpected and mis-shaped entry at once. The key tables that rename each source live in ``keymaps.py``.
"""
import io
import pickle
import zipfile
from pathlib import Path
from typing import Dict, List, Mapping

import numpy as np
import torch
from torch import nn

from modelscope_plugin.errors import CheckpointError

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
} | {f"torch.{kind}Storage"
     for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")}


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
            weights_only_error = error  # a legacy (non-zip) file goes on to the plain-pickle reader below
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:  # OSError: a cut zip's seek fails
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt: {error}") from error
        if zipfile.is_zipfile(path):
            # torch's weights-only unpickler cannot fill dict subclasses such as the pickled mmcv ConfigDict of
            # EasyCV exports; the restricted unpickler can, and still refuses any global not listed above
            try:
                return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module)
            except CheckpointError as refusal:
                raise CheckpointError(f"refusing to load {path}: {refusal}") from weights_only_error
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, KeyError,
                    ValueError) as error:
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


def extract_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict (``state_dict`` for mmdet/EasyCV, ``model`` for detectron2), ``module.``
    stripped."""
    for container_key in ("state_dict", "model"):
        if isinstance(checkpoint.get(container_key), Mapping):
            checkpoint = checkpoint[container_key]
            break
    state_dict = to_tensors(checkpoint)
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


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
