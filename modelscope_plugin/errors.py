"""The errors a user can cause, in one place, and per-item error entries for list inputs.

Every bad input raises exactly one of these, with a message naming the input and the reason:

=========================  ===================================================================================
``ImageInputError``        an image: missing, empty, truncated or corrupt file, unreachable URL, too many pixels
                           for PIL, unsupported type, dtype, shape or values (NaN, inf, out of range)
``CheckpointError``        a weights file: missing, empty, truncated, carrying code (refused), or not matching
                           the network (missing / unexpected / mis-shaped keys, all listed at once)
``ModelDirError``          a model directory: missing, no or invalid configuration.json, unknown model type,
                           no or several weights files, class names not matching the classes
``ModelNotAvailableError`` a supported hub id that is neither cached nor downloadable
=========================  ===================================================================================

``ImageInputError``, ``CheckpointError`` and ``ModelDirError`` are ``ValueError``s; ``ModelNotAvailableError`` is a
``RuntimeError``. ``USER_ERRORS`` catches all four (the command line maps them to exit code 1).
"""
from typing import Any, Dict, List, Optional


class ImageInputError(ValueError):
    """An input image cannot be read or has an unsupported type/value."""


_DEFINED_BESIDE_THEIR_CODE = {
    "CheckpointError": "checkpoint", "ModelDirError": "model_dir", "ModelNotAvailableError": "integration.hub",
}


def __getattr__(name: str):
    """``CheckpointError``, ``ModelDirError``, ``ModelNotAvailableError`` and ``USER_ERRORS``, imported on first use
    so that this module never takes part in an import cycle."""
    import importlib

    if name in _DEFINED_BESIDE_THEIR_CODE:
        return getattr(importlib.import_module(f"{__package__}.{_DEFINED_BESIDE_THEIR_CODE[name]}"), name)
    if name == "USER_ERRORS":
        return (ImageInputError,) + tuple(__getattr__(error_name) for error_name in _DEFINED_BESIDE_THEIR_CODE)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ON_ERROR_CHOICES = ("raise", "return")


def describe_input(item: Any) -> str:
    """A short name for an input in messages: the path/URL itself, else its type and shape."""
    if isinstance(item, str):
        return item
    shape = getattr(item, "shape", None) if not hasattr(item, "mode") else (item.height, item.width)
    dtype = getattr(item, "dtype", None)
    details = ", ".join(str(value) for value in (shape and tuple(shape), dtype) if value is not None)
    return f"{type(item).__name__}({details})" if details else type(item).__name__


def error_entry(index: int, item: Any, error: Exception) -> Dict[str, Any]:
    """The result of a bad list item under ``on_error="return"``: no segments, and what went wrong."""
    return {"masks": [], "labels": [], "scores": [],
            "error": {"index": index, "input": describe_input(item), "type": type(error).__name__, "message": str(error)}}


class PerItemErrorsMixin:
    """``on_error`` for list inputs of a ModelScope ``Pipeline`` whose ``preprocess`` reads images with ``load_image``.

    ``on_error="raise"`` (default, as ModelScope): the first bad item raises its ``ImageInputError``, prefixed with
    its position in the list. ``on_error="return"``: a bad item gets ``error_entry(...)`` in its place and every
    other item its normal result. Items are decoded one chunk (``batch_size``, default 1) at a time.
    """

    def __call__(self, input, *args, on_error: str = "raise", **kwargs):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, not {on_error!r}")
        if not isinstance(input, list):
            return super().__call__(input, *args, **kwargs)
        from PIL import Image

        from .preprocessing import load_image

        self._sanitize_parameters(**{key: value for key, value in kwargs.items() if key != "batch_size"})
        chunk_size = kwargs.get("batch_size") or 1
        results: List[Optional[Dict[str, Any]]] = [None] * len(input)
        for start in range(0, len(input), chunk_size):
            loaded_indices: List[int] = []
            loaded_images: List[Image.Image] = []
            for index in range(start, min(start + chunk_size, len(input))):
                try:
                    # decoded once here; a PIL RGB image without EXIF goes through load_image unchanged
                    loaded_images.append(Image.fromarray(load_image(input[index])))
                except ImageInputError as error:
                    if on_error == "raise":
                        raise ImageInputError(f"list item {index}: {error}") from error
                    results[index] = error_entry(index, input[index], error)
                    continue
                loaded_indices.append(index)
            if loaded_images:
                for index, result in zip(loaded_indices, super().__call__(loaded_images, *args, **kwargs)):
                    results[index] = result
        return results
