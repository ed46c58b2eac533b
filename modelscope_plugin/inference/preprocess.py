"""Image loading and the resize / normalise / pad step, recorded per image so post-processing can undo it.

Every image is padded on its own (to a multiple of ``size_divisor``): Mask2Former's position encodings and
deformable-attention reference points span the padded map, so padding images of different sizes to a common
batch shape would change their answers. ``group_by_padded_size`` batches images whose padded sizes agree.
FastInst picks its queries among the pixels of its stride-16 feature map, so for it an elongated image is padded
further until that map has at least as many pixels as queries (``padded_size``); post-processing crops all padding.

EoMT's semantic recipe (transformers' ``EomtImageProcessor`` with ``do_split_image``) does not pad: the short side is
resized to the network's square input and the long side is covered by overlapping square windows
(``prepare_windows``), each run on its own; post-processing averages their per-class evidence.
"""
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from modelscope_plugin.config import PreprocessConfig
from modelscope_plugin.errors import ImageInputError

ImageInput = Union[str, Path, Image.Image, np.ndarray]


@dataclass
class PreparedImage:
    tensor: torch.Tensor
    """(3, padded_height, padded_width) float32, normalised, zero padding at the bottom/right."""
    original_size: Tuple[int, int]
    """(height, width) of the input after EXIF rotation; outputs come back at this size."""
    resized_size: Tuple[int, int]
    """(height, width) after resizing, before padding."""
    window_starts: Tuple[int, ...] = ()
    """Sliding-window inference only: the first row (image taller than wide) or column of each square window along
    the long side of ``tensor``, which then holds the resized image unpadded."""

    @property
    def padded_size(self) -> Tuple[int, int]:
        return tuple(self.tensor.shape[-2:])

    @property
    def window_size(self) -> int:
        """Side of the square windows (the short side of the resized image); 0 without windows."""
        return min(self.resized_size) if self.window_starts else 0

    def network_input(self) -> torch.Tensor:
        """(N, 3, S, S) windows, or the padded image as a batch of one (1, 3, H, W)."""
        if not self.window_starts:
            return self.tensor[None]
        size = self.window_size
        if self.resized_size[0] > self.resized_size[1]:
            return torch.stack([self.tensor[:, start:start + size, :] for start in self.window_starts])
        return torch.stack([self.tensor[:, :, start:start + size] for start in self.window_starts])


def _read_path_or_url(source: str) -> Image.Image:
    if source.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(source, timeout=30)
            response.raise_for_status()
        except requests.RequestException as error:
            raise ImageInputError(f"cannot download image {source}: {error}") from error
        if not response.content:
            raise ImageInputError(f"image {source} is empty (the server sent 0 bytes)")
        data = io.BytesIO(response.content)
    else:
        path = Path(source)
        if path.is_dir():
            raise ImageInputError(f"image {source} is a directory, not an image file")
        if not path.is_file():
            raise ImageInputError(f"image file {source} does not exist")
        if path.stat().st_size == 0:
            raise ImageInputError(f"image file {source} is empty (0 bytes)")
        data = path
    try:
        image = Image.open(data)
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"image {source} has too many pixels for PIL's decompression-bomb guard ({error}); "
                              "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = "is truncated" if "truncated" in str(error) else "is not a readable image"
        raise ImageInputError(f"image {source} {reason}: {error}") from error
    return image


def describe_input(item: Any) -> str:
    """A short name for an input in messages: the path/URL itself, else its type and shape."""
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, Image.Image):
        shape = (item.height, item.width)
    else:
        shape = getattr(item, "shape", None)
    dtype = getattr(item, "dtype", None)
    details = ", ".join(str(value) for value in (shape and tuple(shape), dtype) if value is not None)
    return f"{type(item).__name__}({details})" if details else type(item).__name__


def load_image(source: ImageInput) -> np.ndarray:
    """Any supported input -> (H, W, 3) uint8 RGB.

    - path or URL: decoded with PIL, EXIF orientation applied, converted to RGB (grayscale, palette, RGBA,
      CMYK and 16-bit modes go through PIL's ``convert('RGB')``, as ModelScope's ``load_image`` does).
    - PIL image: EXIF orientation applied, converted to RGB.
    - numpy array: ModelScope/cv2 convention, i.e. BGR (H, W, 3), BGRA (H, W, 4) or grayscale (H, W); uint8,
      uint16 (scaled by 1/257 to 8 bits) or float in [0, 255].
    Anything else, or a file/array that cannot be decoded, raises one ``ImageInputError`` naming it and why.
    """
    if isinstance(source, (str, Path)):
        image = _read_path_or_url(str(source))
        return _pil_to_rgb(image, str(source))
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, f"PIL image ({source.mode}, {source.width}x{source.height})")
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    raise ImageInputError(f"unsupported image input {describe_input(source)}; expected a path, URL, PIL image or numpy "
                          "array (a tensor: convert it to an (H, W, 3) BGR uint8 array first)")


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    try:
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # a lazily opened PIL image may fail only now
        raise ImageInputError(f"image {name} cannot be decoded: {error}") from error
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageInputError(f"image {name} is empty: {rgb.shape[1]}x{rgb.shape[0]} pixels")
    return rgb


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    name = f"image array of shape {array.shape} and dtype {array.dtype}"
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageInputError(f"{name}: expected shape (H, W), (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageInputError(f"{name} is empty")
    if array.dtype == np.uint8:
        pass
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError(f"{name} contains NaN or infinite values")
        if array.min() < 0 or array.max() > 255:
            raise ImageInputError(f"{name}: float values must lie in [0, 255]; got [{array.min()}, {array.max()}]")
        array = np.round(array).astype(np.uint8)
    else:
        raise ImageInputError(f"{name}: unsupported dtype; expected uint8, uint16 or float in [0, 255] "
                              "(convert integer arrays with .astype(np.uint8) after checking their range)")
    if array.ndim == 2:
        return np.ascontiguousarray(np.repeat(array[:, :, None], 3, axis=2))
    # BGR(A) -> RGB, alpha dropped
    return np.ascontiguousarray(array[:, :, 2::-1])


def rescaled_size(height: int, width: int, short_side: int, long_side_max: int) -> Tuple[int, int]:
    """mmcv ``rescale_size``: one scale so the short side reaches ``short_side`` unless the long side would pass
    ``long_side_max``; each side rounded as ``int(side * scale + 0.5)``, and at least 1 (where mmcv gives 0 for an
    extreme aspect ratio, e.g. 1 x 5000, and then fails)."""
    scale = min(long_side_max / max(height, width), short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def transformers_rescaled_size(height: int, width: int, short_side: int, long_side_max: int) -> Tuple[int, int]:
    """transformers' ``get_size_with_aspect_ratio`` (DETR's rule): the short side becomes ``short_side`` unless the
    long side would pass ``long_side_max`` (then the short side is that bound's share, rounded); the other side is
    truncated, not rounded."""
    short, long = min(height, width), max(height, width)
    size, exact_size = short_side, float(short_side)
    if long / short * short_side > long_side_max:
        exact_size = long_side_max * short / long
        size = int(round(exact_size))
    if short == size:
        return height, width
    if width < height:
        return max(1, int(exact_size * height / width)), size
    return size, max(1, int(exact_size * width / height))


def normalize_pixels(rgb: np.ndarray, config: PreprocessConfig, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(pixel - mean) / std`` the way the checkpoint's source computes it:
    mmcv.imnormalize multiplies by the float32 reciprocal of std, torchvision (ModelScope's FastInst) divides.
    Written into ``out`` ((3, H, W) float32 on the CPU, e.g. the unpadded part of a padded tensor) when given.

    One channel at a time with numpy's ufuncs: the same float32 operations as a broadcast over (H, W, 3), so the
    same bits, 50x faster than that broadcast over a last axis of 3 (35 ms for a 640x360 image on the 2-core AVX2
    VM), and outside torch's thread pool (whose parallel regions stall for tens of ms on a loaded machine)."""
    if out is None:
        out = torch.empty((3, *rgb.shape[:2]), dtype=torch.float32)
    target = out.numpy()  # shares out's memory
    mean = np.asarray(config.mean, dtype=np.float32)
    if config.divide_by_std:
        scale, operation = np.asarray(config.std, dtype=np.float32), np.divide
    else:
        scale, operation = (1.0 / np.asarray(config.std, dtype=np.float64)).astype(np.float32), np.multiply
    for channel in range(3):
        np.subtract(rgb[:, :, channel], mean[channel], out=target[channel], dtype=np.float32)
        operation(target[channel], scale[channel], out=target[channel])
    return out


def padded_size(resized_size: Tuple[int, int], size_divisor: int, minimum_feature_pixels: int = 0,
                feature_stride: int = 16) -> Tuple[int, int]:
    """The smallest multiple of ``size_divisor`` covering ``resized_size``; while the stride-``feature_stride`` map
    of that size has fewer than ``minimum_feature_pixels`` pixels, its shorter side grows by ``size_divisor``."""
    height, width = (-(-side // size_divisor) * size_divisor for side in resized_size)
    while (height // feature_stride) * (width // feature_stride) < minimum_feature_pixels:
        if height <= width:
            height += size_divisor
        else:
            width += size_divisor
    return height, width


def resize_rgb(rgb: np.ndarray, resized_height: int, resized_width: int, backend: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (resized_height, resized_width, 3) uint8 with the checkpoint source's bilinear resize."""
    if backend == "cv2":
        # cv2's bilinear resize on uint8 (fixed-point), as mmcv.imrescale
        return cv2.resize(rgb, (resized_width, resized_height), interpolation=cv2.INTER_LINEAR)
    if backend == "pil":
        return np.asarray(Image.fromarray(rgb).resize((resized_width, resized_height), Image.BILINEAR))
    if backend == "torchvision":
        from torchvision.transforms.v2 import functional as tvF

        # (H, W, 3) -> (3, H, W) uint8, antialiased bilinear, and back
        image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)
        return tvF.resize(image, [resized_height, resized_width], interpolation=tvF.InterpolationMode.BILINEAR,
                          antialias=True).permute(1, 2, 0).numpy()
    raise ValueError(f"unknown resize_backend {backend!r}")


def prepare_image(rgb: np.ndarray, config: PreprocessConfig, minimum_feature_pixels: int = 0) -> PreparedImage:
    """(H, W, 3) uint8 RGB -> resized, normalised, padded network input; ``minimum_feature_pixels``: see
    ``padded_size`` (FastInst's number of queries)."""
    height, width = rgb.shape[:2]
    if config.size_rule == "transformers":
        resized_height, resized_width = transformers_rescaled_size(height, width, config.short_side,
                                                                   config.long_side_max)
    else:
        resized_height, resized_width = rescaled_size(height, width, config.short_side, config.long_side_max)
    resized = resize_rgb(rgb, resized_height, resized_width, config.resize_backend)
    padded_height, padded_width = padded_size((resized_height, resized_width), config.size_divisor,
                                              minimum_feature_pixels)
    tensor = torch.empty(3, padded_height, padded_width, dtype=torch.float32)
    normalize_pixels(resized, config, out=tensor[:, :resized_height, :resized_width])
    # padding below and right of the image: black pixels normalised, or zeros (numpy, as above)
    black = normalize_pixels(np.zeros((1, 1, 3), dtype=np.uint8), config).numpy() if config.pad_black else 0.0
    padded = tensor.numpy()
    padded[:, resized_height:, :] = black
    padded[:, :resized_height, resized_width:] = black
    return PreparedImage(tensor=tensor, original_size=(height, width), resized_size=(resized_height, resized_width))


# an image longer than this many times its short side is refused for sliding windows (a 1 x 5000 banner would
# otherwise become 5000 windows)
MAX_WINDOWS = 32


def window_starts(length: int, window_size: int) -> Tuple[int, ...]:
    """Starts of the fewest ``window_size`` windows covering ``length`` pixels, their overlap spread evenly (the
    first at 0, the last ending at ``length``, up to the truncation of fractional starts), as transformers'
    ``EomtImageProcessor._split_image``."""
    count = -(-length // window_size)
    overlap = (count * window_size - length) / (count - 1) if count > 1 else 0
    return tuple(int(index * (window_size - overlap)) for index in range(count))


def prepare_windows(rgb: np.ndarray, config: PreprocessConfig, window_size: int) -> PreparedImage:
    """(H, W, 3) uint8 RGB -> the image resized so its short side is ``window_size`` (the long side in proportion,
    truncated: ``int(window_size * long / short)``), normalised, unpadded, with the starts of the square windows
    along its long side (``PreparedImage.network_input`` cuts them)."""
    height, width = rgb.shape[:2]
    if max(height, width) > MAX_WINDOWS * min(height, width):
        raise ImageInputError(f"image of {width}x{height} pixels is too elongated for sliding windows: its short side "
                              f"resized to {window_size} would need more than {MAX_WINDOWS} windows; crop it, or ask "
                              "for the panoptic task, which pads instead")
    if height <= width:
        resized_height, resized_width = window_size, int(window_size * width / height)
    else:
        resized_height, resized_width = int(window_size * height / width), window_size
    resized = resize_rgb(rgb, resized_height, resized_width, config.resize_backend)
    tensor = normalize_pixels(resized, config)  # (3, H, W)
    return PreparedImage(tensor=tensor, original_size=(height, width), resized_size=(resized_height, resized_width),
                         window_starts=window_starts(max(resized_height, resized_width), window_size))


def group_by_padded_size(images: Sequence[PreparedImage]) -> List[Tuple[List[int], torch.Tensor]]:
    """Batches of images sharing a padded size: [(indices into ``images``, (B, 3, H, W) tensor)]. An image cut into
    windows is a batch of its own, (N windows, 3, S, S)."""
    groups: Dict[Any, List[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(("windows", index) if image.window_starts else image.padded_size, []).append(index)
    return [(indices, torch.cat([images[index].network_input() for index in indices])) for indices in groups.values()]
