"""Synthetic scenes in COCO format (instances + panoptic + semantic), seeded and deterministic.

A scene (256 x 256 by default):
- stuff: 3 classes (stripes, smooth gradient, noise texture). 1-3 random polylines, each running from one image
  border to the opposite one, split the image; every cell of that arrangement gets a stuff class and its own
  texture parameters (colours, period, angle, noise scale). Cells of one class form one panoptic segment.
- things: 4 classes (disc, triangle, square, 5-point star), 2-12 per image with at least one class present
  twice or more, sizes 10-90 px (the diameter of the circle each shape is inscribed in), random rotation, filled
  with a random colour or a two-colour texture (checker or stripes). Shapes are painted in order, later ones on
  top; a shape is only placed if no instance (itself included) then has more than 40 % of its area hidden.

Layout written by ``write_dataset(root, split, ...)``::

    root/{split}/000001.png                         RGB images
    root/annotations/instances_{split}.json         things, visible masks as compressed RLE; ``amodal_area``
                                                    is each shape's full area before occlusion
    root/annotations/panoptic_{split}.json          + root/annotations/panoptic_{split}/000001.png (id = R + 256 G
                                                    + 256^2 B; thing id = category_id * 1000 + k, stuff id =
                                                    category_id * 1000)
    root/annotations/semantic_{split}/000001.png    uint8 class index + 1 (categories' order), 0 = void

Image ``i`` (1-based) of a split is drawn from ``numpy.random.default_rng([seed, i])`` alone, so it does not
depend on how many images are written.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from matplotlib.path import Path as MatplotlibPath
from PIL import Image
from pycocotools import mask as mask_utils

from modelscope_plugin.data.categories import Category
from modelscope_plugin.data.datasets import id_to_rgb, read_coco_instances, read_coco_panoptic, read_label_folders

SYNTHETIC_CATEGORIES: List[Category] = [
    Category(1, "disc", True, (220, 20, 60)),
    Category(2, "triangle", True, (0, 82, 255)),
    Category(3, "square", True, (250, 170, 30)),
    Category(4, "star", True, (0, 200, 120)),
    Category(5, "stripes", False, (140, 80, 200)),
    Category(6, "gradient", False, (120, 166, 157)),
    Category(7, "noise", False, (90, 90, 90)),
]
THING_CATEGORIES = [category for category in SYNTHETIC_CATEGORIES if category.isthing]
STUFF_CATEGORIES = [category for category in SYNTHETIC_CATEGORIES if not category.isthing]
# inner / outer radius of a regular 5-point star (pentagram): sin 18 deg / sin 54 deg
STAR_INNER_RATIO = math.sin(math.radians(18)) / math.sin(math.radians(54))


@dataclass
class SceneConfig:
    image_size: int = 256
    min_things: int = 2
    max_things: int = 12
    min_thing_size: float = 10.0
    max_thing_size: float = 90.0
    """Diameter (px) of the circle a shape is inscribed in."""
    max_occlusion: float = 0.4
    """Largest hidden fraction of any instance's own area."""
    min_lines: int = 1
    max_lines: int = 3
    placement_attempts: int = 60
    """Random placements tried per shape before it is left out."""

    def __post_init__(self):
        if not 0 < self.min_thing_size <= self.max_thing_size <= self.image_size:
            raise ValueError(f"thing sizes must satisfy 0 < min ({self.min_thing_size}) <= max ({self.max_thing_size}) "
                             f"<= image_size ({self.image_size})")
        if not 1 <= self.min_things <= self.max_things or self.min_things < 2:
            raise ValueError(f"things per image must satisfy 2 <= min ({self.min_things}) <= max ({self.max_things})")
        if not 1 <= self.min_lines <= self.max_lines:
            raise ValueError(f"polylines per image must satisfy 1 <= min ({self.min_lines}) <= max ({self.max_lines})")
        if not 0 <= self.max_occlusion < 1:
            raise ValueError(f"max_occlusion must lie in [0, 1), got {self.max_occlusion}")

    @classmethod
    def scaled(cls, image_size: int) -> "SceneConfig":
        """The 256-pixel specification at another image size (thing sizes in proportion)."""
        base = cls()
        ratio = image_size / base.image_size
        return cls(image_size=image_size, min_thing_size=base.min_thing_size * ratio,
                   max_thing_size=base.max_thing_size * ratio)


@dataclass
class Thing:
    category_id: int
    center: Tuple[float, float]
    """(x, y) in pixels."""
    size: float
    rotation: float
    """Radians."""
    fill: Dict[str, Any]
    amodal_mask: np.ndarray = field(repr=False)
    """(H, W) bool: the whole shape."""
    visible_mask: np.ndarray = field(repr=False)
    """(H, W) bool: what the shapes painted later leave of it."""


@dataclass
class Scene:
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    stuff_class: np.ndarray
    """(H, W) int: index into STUFF_CATEGORIES of the stuff under every pixel (things included)."""
    things: List[Thing]
    polylines: List[np.ndarray]
    """Each (V, 2) vertices (x, y)."""


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _coordinates(size: int) -> Tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size]
    return xs.astype(np.float64), ys.astype(np.float64)


def _stripes(rng: np.random.Generator, size: int, period_range: Tuple[float, float]) -> np.ndarray:
    xs, ys = _coordinates(size)
    angle, period, phase = rng.uniform(0, math.pi), rng.uniform(*period_range), rng.uniform(0, 1)
    first, second = _random_colour(rng), _random_colour(rng)
    band = np.floor(((xs * math.cos(angle) + ys * math.sin(angle)) / period + phase) * 2) % 2
    return np.where(band[..., None] > 0, first, second)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    xs, ys = _coordinates(size)
    angle = rng.uniform(0, 2 * math.pi)
    first, second = _random_colour(rng), _random_colour(rng)
    projection = xs * math.cos(angle) + ys * math.sin(angle)
    position = (projection - projection.min()) / max(float(np.ptp(projection)), 1e-9)
    return first + position[..., None] * (second - first)


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Base colour + blocky noise (cells of 2-8 px) + per-pixel noise."""
    base, amplitude = _random_colour(rng), rng.uniform(25, 70)
    cell = int(rng.integers(2, 9))
    coarse = rng.normal(0, amplitude, (size // cell + 1, size // cell + 1, 3))
    blocky = np.repeat(np.repeat(coarse, cell, axis=0), cell, axis=1)[:size, :size]
    return base + blocky + rng.normal(0, amplitude / 2, (size, size, 3))


def _stuff_texture(rng: np.random.Generator, stuff_index: int, size: int) -> np.ndarray:
    name = STUFF_CATEGORIES[stuff_index].name
    if name == "stripes":
        return _stripes(rng, size, (6.0, 20.0))
    if name == "gradient":
        return _gradient(rng, size)
    return _noise(rng, size)


def _thing_fill(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A colour (half the time) or a two-colour checker / stripe texture over the whole image."""
    kind = ("solid", "checker", "stripes")[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    if kind == "solid":
        colour = _random_colour(rng)
        return np.broadcast_to(colour, (size, size, 3)), {"kind": kind, "colour": colour.astype(int).tolist()}
    if kind == "stripes":
        return _stripes(rng, size, (3.0, 9.0)), {"kind": kind}
    cell = int(rng.integers(3, 9))
    first, second = _random_colour(rng), _random_colour(rng)
    xs, ys = _coordinates(size)
    checker = ((xs // cell + ys // cell) % 2)[..., None] > 0
    return np.where(checker, first, second), {"kind": kind, "cell": cell}


def _random_polyline(rng: np.random.Generator, size: int) -> Tuple[np.ndarray, bool]:
    """3-5 vertices from one border to the opposite one; (vertices (x, y), horizontal?)."""
    count = int(rng.integers(3, 6))
    along = np.linspace(0, size - 1, count)
    across = rng.uniform(0.15 * size, 0.85 * size, count)
    horizontal = bool(rng.integers(0, 2))
    vertices = np.stack([along, across], 1) if horizontal else np.stack([across, along], 1)
    return vertices, horizontal


def _side_of(vertices: np.ndarray, horizontal: bool, size: int) -> np.ndarray:
    """(H, W) bool: pixels below (horizontal line) or right of (vertical line) the polyline."""
    xs, ys = _coordinates(size)
    if horizontal:
        return ys > np.interp(xs, vertices[:, 0], vertices[:, 1])
    return xs > np.interp(ys, vertices[:, 1], vertices[:, 0])


def _shape_polygon(name: str, center: Tuple[float, float], size: float, rotation: float) -> np.ndarray:
    """(V, 2) vertices (x, y) of a triangle / square / star inscribed in a circle of diameter ``size``."""
    radius = size / 2
    if name == "triangle":
        angles, radii = rotation + np.arange(3) * 2 * math.pi / 3, np.full(3, radius)
    elif name == "square":
        angles, radii = rotation + math.pi / 4 + np.arange(4) * math.pi / 2, np.full(4, radius)
    elif name == "star":
        angles = rotation - math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER_RATIO)
    else:
        raise ValueError(f"no polygon for shape {name!r}")
    return np.stack([center[0] + radii * np.cos(angles), center[1] + radii * np.sin(angles)], 1)


def rasterize_shape(name: str, center: Tuple[float, float], size: float, rotation: float,
                    image_size: int) -> np.ndarray:
    """(H, W) bool mask of one shape: the pixels whose centre (column + 0.5, row + 0.5) lies inside it."""
    radius = size / 2
    # only the pixels of the shape's bounding square are tested
    left, top = max(int(center[0] - radius), 0), max(int(center[1] - radius), 0)
    right, bottom = min(int(center[0] + radius) + 1, image_size), min(int(center[1] + radius) + 1, image_size)
    mask = np.zeros((image_size, image_size), bool)
    if right <= left or bottom <= top:
        return mask
    ys, xs = np.mgrid[top:bottom, left:right] + 0.5
    if name == "disc":
        inside = (xs - center[0]) ** 2 + (ys - center[1]) ** 2 <= radius ** 2
    else:
        polygon = MatplotlibPath(_shape_polygon(name, center, size, rotation))
        # (h, w) -> (h * w, 2) pixel centres as (x, y)
        inside = polygon.contains_points(np.stack([xs.ravel(), ys.ravel()], 1)).reshape(xs.shape)
    mask[top:bottom, left:right] = inside
    return mask


def _thing_classes(rng: np.random.Generator, count: int) -> List[int]:
    """Indices into THING_CATEGORIES with one class at least twice (its two instances are placed first)."""
    repeated = int(rng.integers(0, len(THING_CATEGORIES)))
    rest = rng.integers(0, len(THING_CATEGORIES), count - 2).tolist()
    return [repeated, repeated] + [int(value) for value in rest]


def generate_scene(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> Scene:
    size = config.image_size
    # stuff: the cells of the polylines' arrangement, each with a class and its own texture
    polylines, cell_code = [], np.zeros((size, size), np.int64)
    for line_index in range(int(rng.integers(config.min_lines, config.max_lines + 1))):
        vertices, horizontal = _random_polyline(rng, size)
        polylines.append(vertices)
        cell_code |= _side_of(vertices, horizontal, size).astype(np.int64) << line_index
    image = np.zeros((size, size, 3), np.float64)
    stuff_class = np.zeros((size, size), np.int64)
    for code in np.unique(cell_code):
        cell = cell_code == code
        stuff_index = int(rng.integers(0, len(STUFF_CATEGORIES)))
        stuff_class[cell] = stuff_index
        image[cell] = _stuff_texture(rng, stuff_index, size)[cell]

    things: List[Thing] = []
    count = int(rng.integers(config.min_things, config.max_things + 1))
    for thing_index in _thing_classes(rng, count):
        category = THING_CATEGORIES[thing_index]
        for _ in range(config.placement_attempts):
            shape_size = rng.uniform(config.min_thing_size, config.max_thing_size)
            radius = shape_size / 2
            center = (rng.uniform(radius, size - radius), rng.uniform(radius, size - radius))
            rotation = rng.uniform(0, 2 * math.pi)
            mask = rasterize_shape(category.name, center, shape_size, rotation, size)
            if not mask.any():
                continue
            hidden_fine = all((thing.visible_mask & ~mask).sum() >= (1 - config.max_occlusion) * thing.amodal_mask.sum()
                              for thing in things)
            if hidden_fine:
                break
        else:
            continue  # no placement respects the occlusion bound: the shape is left out
        fill, fill_description = _thing_fill(rng, size)
        image[mask] = fill[mask]
        for thing in things:
            thing.visible_mask &= ~mask
        things.append(Thing(category.id, center, float(shape_size), float(rotation), fill_description, mask,
                            mask.copy()))
    return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8), stuff_class, things, polylines)


def _bbox(mask: np.ndarray) -> List[int]:
    """COCO [x, y, w, h] of a non-empty mask."""
    rows, columns = np.nonzero(mask)
    return [int(columns.min()), int(rows.min()), int(columns.max() - columns.min() + 1),
            int(rows.max() - rows.min() + 1)]


def scene_segments(scene: Scene) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """(H, W) panoptic ids and COCO ``segments_info`` (things in painting order, then stuff by class)."""
    panoptic = np.zeros(scene.stuff_class.shape, np.int64)
    segments = []
    covered = np.zeros(scene.stuff_class.shape, bool)
    instance_number: Dict[int, int] = {}
    for thing in scene.things:
        instance_number[thing.category_id] = instance_number.get(thing.category_id, 0) + 1
        segment_id = thing.category_id * 1000 + instance_number[thing.category_id]
        panoptic[thing.visible_mask] = segment_id
        covered |= thing.visible_mask
        segments.append({"id": segment_id, "category_id": thing.category_id, "iscrowd": 0,
                         "area": int(thing.visible_mask.sum()), "bbox": _bbox(thing.visible_mask)})
    for stuff_index, category in enumerate(STUFF_CATEGORIES):
        region = (scene.stuff_class == stuff_index) & ~covered
        if region.any():
            panoptic[region] = category.id * 1000
            segments.append({"id": category.id * 1000, "category_id": category.id, "iscrowd": 0,
                             "area": int(region.sum()), "bbox": _bbox(region)})
    return panoptic, segments


@dataclass
class SyntheticSplit:
    """Where ``write_dataset`` put one split."""

    root: Path
    split: str

    @property
    def image_folder(self) -> Path:
        return self.root / self.split

    @property
    def instances_json(self) -> Path:
        return self.root / "annotations" / f"instances_{self.split}.json"

    @property
    def panoptic_json(self) -> Path:
        return self.root / "annotations" / f"panoptic_{self.split}.json"

    @property
    def panoptic_folder(self) -> Path:
        return self.root / "annotations" / f"panoptic_{self.split}"

    @property
    def semantic_folder(self) -> Path:
        return self.root / "annotations" / f"semantic_{self.split}"

    def panoptic_rows(self, on_error: str = "raise"):
        return read_coco_panoptic(str(self.panoptic_json), str(self.panoptic_folder), str(self.image_folder),
                                  on_error)[0]

    def instance_rows(self, on_error: str = "raise"):
        return read_coco_instances(str(self.instances_json), str(self.image_folder), on_error)[0]

    def semantic_rows(self, on_error: str = "raise"):
        return read_label_folders(str(self.image_folder), str(self.semantic_folder), len(SYNTHETIC_CATEGORIES),
                                  on_error)[0]


def _category_dicts(categories: List[Category]) -> List[Dict[str, Any]]:
    return [{"id": c.id, "name": c.name, "isthing": int(c.isthing), "color": list(c.color),
             "supercategory": "shape" if c.isthing else "texture"} for c in categories]


def write_dataset(root, split: str, num_images: int, seed: int, config: SceneConfig = SceneConfig()) -> SyntheticSplit:
    """Writes ``num_images`` scenes of ``split`` under ``root`` (see the module docstring); refuses to overwrite."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if not split or os.sep in split or split in (".", "..", "annotations"):
        raise ValueError(f"split must be a plain folder name other than 'annotations', got {split!r}")
    paths = SyntheticSplit(Path(root), split)
    existing = [path for path in (paths.image_folder, paths.instances_json, paths.panoptic_json, paths.panoptic_folder,
                                  paths.semantic_folder) if path.exists()]
    if existing:
        raise FileExistsError(f"synthetic split {split!r} already exists under {root} ({existing[0]}); "
                              "choose another root or split")
    for folder in (paths.image_folder, paths.panoptic_folder, paths.semantic_folder):
        folder.mkdir(parents=True)
    index_of = {category.id: index for index, category in enumerate(SYNTHETIC_CATEGORIES)}
    images, instance_annotations, panoptic_annotations = [], [], []
    for image_id in range(1, num_images + 1):
        scene = generate_scene(np.random.default_rng([seed, image_id]), config)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(scene.image).save(paths.image_folder / file_name)
        panoptic, segments = scene_segments(scene)
        Image.fromarray(id_to_rgb(panoptic)).save(paths.panoptic_folder / file_name)
        semantic = np.zeros(panoptic.shape, np.uint8)
        for segment in segments:
            semantic[panoptic == segment["id"]] = index_of[segment["category_id"]] + 1
        Image.fromarray(semantic).save(paths.semantic_folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": config.image_size, "width": config.image_size})
        panoptic_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
        for thing, segment in zip(scene.things, segments):
            rle = mask_utils.encode(np.asfortranarray(thing.visible_mask.astype(np.uint8)))
            instance_annotations.append({
                "id": len(instance_annotations) + 1, "image_id": image_id, "category_id": thing.category_id,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": segment["area"], "bbox": segment["bbox"], "iscrowd": 0,
                "amodal_area": int(thing.amodal_mask.sum()),
                "shape": {"center": list(thing.center), "size": thing.size, "rotation": thing.rotation,
                          "fill": thing.fill},
            })
    info = {"description": "modelscope_plugin synthetic shapes", "seed": seed, "split": split,
            "scene_config": asdict(config)}
    with open(paths.instances_json, "w") as handle:
        json.dump({"info": info, "images": images, "annotations": instance_annotations,
                   "categories": _category_dicts(THING_CATEGORIES)}, handle)
    with open(paths.panoptic_json, "w") as handle:
        json.dump({"info": info, "images": images, "annotations": panoptic_annotations,
                   "categories": _category_dicts(SYNTHETIC_CATEGORIES)}, handle)
    return paths


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a synthetic COCO-format segmentation dataset.")
    parser.add_argument("root")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    arguments = parser.parse_args(argv)
    config = SceneConfig.scaled(arguments.image_size)
    paths = write_dataset(arguments.root, arguments.split, arguments.num_images, arguments.seed, config)
    print(f"wrote {arguments.num_images} images to {paths.image_folder}, annotations in {paths.panoptic_json.parent}")


if __name__ == "__main__":
    main()
