"""COCO panoptic categories (133: 80 things then 53 stuff), in contiguous-index order.

From cocodataset/panopticapi ``panoptic_coco_categories.json`` (CC BY 4.0); the same order, names and colours as
detectron2, Mask2Former and mmdet 2.x ``CocoPanopticDataset`` (whose palette these colours are).
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple


class Category(NamedTuple):
    id: int  # dataset category id
    name: str
    isthing: bool
    color: Tuple[int, int, int]  # RGB


COCO_PANOPTIC_CATEGORIES: List[Category] = [
    Category(1, 'person', True, (220, 20, 60)),
    Category(2, 'bicycle', True, (119, 11, 32)),
    Category(3, 'car', True, (0, 0, 142)),
    Category(4, 'motorcycle', True, (0, 0, 230)),
    Category(5, 'airplane', True, (106, 0, 228)),
    Category(6, 'bus', True, (0, 60, 100)),
    Category(7, 'train', True, (0, 80, 100)),
    Category(8, 'truck', True, (0, 0, 70)),
    Category(9, 'boat', True, (0, 0, 192)),
    Category(10, 'traffic light', True, (250, 170, 30)),
    Category(11, 'fire hydrant', True, (100, 170, 30)),
    Category(13, 'stop sign', True, (220, 220, 0)),
    Category(14, 'parking meter', True, (175, 116, 175)),
    Category(15, 'bench', True, (250, 0, 30)),
    Category(16, 'bird', True, (165, 42, 42)),
    Category(17, 'cat', True, (255, 77, 255)),
    Category(18, 'dog', True, (0, 226, 252)),
    Category(19, 'horse', True, (182, 182, 255)),
    Category(20, 'sheep', True, (0, 82, 0)),
    Category(21, 'cow', True, (120, 166, 157)),
    Category(22, 'elephant', True, (110, 76, 0)),
    Category(23, 'bear', True, (174, 57, 255)),
    Category(24, 'zebra', True, (199, 100, 0)),
    Category(25, 'giraffe', True, (72, 0, 118)),
    Category(27, 'backpack', True, (255, 179, 240)),
    Category(28, 'umbrella', True, (0, 125, 92)),
    Category(31, 'handbag', True, (209, 0, 151)),
    Category(32, 'tie', True, (188, 208, 182)),
    Category(33, 'suitcase', True, (0, 220, 176)),
    Category(34, 'frisbee', True, (255, 99, 164)),
    Category(35, 'skis', True, (92, 0, 73)),
    Category(36, 'snowboard', True, (133, 129, 255)),
    Category(37, 'sports ball', True, (78, 180, 255)),
    Category(38, 'kite', True, (0, 228, 0)),
    Category(39, 'baseball bat', True, (174, 255, 243)),
    Category(40, 'baseball glove', True, (45, 89, 255)),
    Category(41, 'skateboard', True, (134, 134, 103)),
    Category(42, 'surfboard', True, (145, 148, 174)),
    Category(43, 'tennis racket', True, (255, 208, 186)),
    Category(44, 'bottle', True, (197, 226, 255)),
    Category(46, 'wine glass', True, (171, 134, 1)),
    Category(47, 'cup', True, (109, 63, 54)),
    Category(48, 'fork', True, (207, 138, 255)),
    Category(49, 'knife', True, (151, 0, 95)),
    Category(50, 'spoon', True, (9, 80, 61)),
    Category(51, 'bowl', True, (84, 105, 51)),
    Category(52, 'banana', True, (74, 65, 105)),
    Category(53, 'apple', True, (166, 196, 102)),
    Category(54, 'sandwich', True, (208, 195, 210)),
    Category(55, 'orange', True, (255, 109, 65)),
    Category(56, 'broccoli', True, (0, 143, 149)),
    Category(57, 'carrot', True, (179, 0, 194)),
    Category(58, 'hot dog', True, (209, 99, 106)),
    Category(59, 'pizza', True, (5, 121, 0)),
    Category(60, 'donut', True, (227, 255, 205)),
    Category(61, 'cake', True, (147, 186, 208)),
    Category(62, 'chair', True, (153, 69, 1)),
    Category(63, 'couch', True, (3, 95, 161)),
    Category(64, 'potted plant', True, (163, 255, 0)),
    Category(65, 'bed', True, (119, 0, 170)),
    Category(67, 'dining table', True, (0, 182, 199)),
    Category(70, 'toilet', True, (0, 165, 120)),
    Category(72, 'tv', True, (183, 130, 88)),
    Category(73, 'laptop', True, (95, 32, 0)),
    Category(74, 'mouse', True, (130, 114, 135)),
    Category(75, 'remote', True, (110, 129, 133)),
    Category(76, 'keyboard', True, (166, 74, 118)),
    Category(77, 'cell phone', True, (219, 142, 185)),
    Category(78, 'microwave', True, (79, 210, 114)),
    Category(79, 'oven', True, (178, 90, 62)),
    Category(80, 'toaster', True, (65, 70, 15)),
    Category(81, 'sink', True, (127, 167, 115)),
    Category(82, 'refrigerator', True, (59, 105, 106)),
    Category(84, 'book', True, (142, 108, 45)),
    Category(85, 'clock', True, (196, 172, 0)),
    Category(86, 'vase', True, (95, 54, 80)),
    Category(87, 'scissors', True, (128, 76, 255)),
    Category(88, 'teddy bear', True, (201, 57, 1)),
    Category(89, 'hair drier', True, (246, 0, 122)),
    Category(90, 'toothbrush', True, (191, 162, 208)),
    Category(92, 'banner', False, (255, 255, 128)),
    Category(93, 'blanket', False, (147, 211, 203)),
    Category(95, 'bridge', False, (150, 100, 100)),
    Category(100, 'cardboard', False, (168, 171, 172)),
    Category(107, 'counter', False, (146, 112, 198)),
    Category(109, 'curtain', False, (210, 170, 100)),
    Category(112, 'door-stuff', False, (92, 136, 89)),
    Category(118, 'floor-wood', False, (218, 88, 184)),
    Category(119, 'flower', False, (241, 129, 0)),
    Category(122, 'fruit', False, (217, 17, 255)),
    Category(125, 'gravel', False, (124, 74, 181)),
    Category(128, 'house', False, (70, 70, 70)),
    Category(130, 'light', False, (255, 228, 255)),
    Category(133, 'mirror-stuff', False, (154, 208, 0)),
    Category(138, 'net', False, (193, 0, 92)),
    Category(141, 'pillow', False, (76, 91, 113)),
    Category(144, 'platform', False, (255, 180, 195)),
    Category(145, 'playingfield', False, (106, 154, 176)),
    Category(147, 'railroad', False, (230, 150, 140)),
    Category(148, 'river', False, (60, 143, 255)),
    Category(149, 'road', False, (128, 64, 128)),
    Category(151, 'roof', False, (92, 82, 55)),
    Category(154, 'sand', False, (254, 212, 124)),
    Category(155, 'sea', False, (73, 77, 174)),
    Category(156, 'shelf', False, (255, 160, 98)),
    Category(159, 'snow', False, (255, 255, 255)),
    Category(161, 'stairs', False, (104, 84, 109)),
    Category(166, 'tent', False, (169, 164, 131)),
    Category(168, 'towel', False, (225, 199, 255)),
    Category(171, 'wall-brick', False, (137, 54, 74)),
    Category(175, 'wall-stone', False, (135, 158, 223)),
    Category(176, 'wall-tile', False, (7, 246, 231)),
    Category(177, 'wall-wood', False, (107, 255, 200)),
    Category(178, 'water-other', False, (58, 41, 149)),
    Category(180, 'window-blind', False, (183, 121, 142)),
    Category(181, 'window-other', False, (255, 73, 97)),
    Category(184, 'tree-merged', False, (107, 142, 35)),
    Category(185, 'fence-merged', False, (190, 153, 153)),
    Category(186, 'ceiling-merged', False, (146, 139, 141)),
    Category(187, 'sky-other-merged', False, (70, 130, 180)),
    Category(188, 'cabinet-merged', False, (134, 199, 156)),
    Category(189, 'table-merged', False, (209, 226, 140)),
    Category(190, 'floor-other-merged', False, (96, 36, 108)),
    Category(191, 'pavement-merged', False, (96, 96, 96)),
    Category(192, 'mountain-merged', False, (64, 170, 64)),
    Category(193, 'grass-merged', False, (152, 251, 152)),
    Category(194, 'dirt-merged', False, (208, 229, 228)),
    Category(195, 'paper-merged', False, (206, 186, 171)),
    Category(196, 'food-other-merged', False, (152, 161, 64)),
    Category(197, 'building-other-merged', False, (116, 112, 0)),
    Category(198, 'rock-merged', False, (0, 114, 143)),
    Category(199, 'wall-other-merged', False, (102, 102, 156)),
    Category(200, 'rug-merged', False, (250, 141, 255)),
]

# mmdet 2.28 ``CocoPanopticDataset.CLASSES`` spells one name differently; checkpoints trained there carry it verbatim.
MMDET_COCO_PANOPTIC_CLASSES: Tuple[str, ...] = tuple(" truck" if c.name == "truck" else c.name
                                                     for c in COCO_PANOPTIC_CATEGORIES)
COCO_PANOPTIC_PALETTE: List[Tuple[int, int, int]] = [c.color for c in COCO_PANOPTIC_CATEGORIES]
COCO_THING_CATEGORIES: List[Category] = [c for c in COCO_PANOPTIC_CATEGORIES if c.isthing]


def default_category_ids(num_classes: int, categories: Sequence[Category]) -> Tuple[int, ...]:
    """Dataset ids of a checkpoint's classes when it does not record them: those of ``categories`` (COCO's, in
    order) when the counts agree, else 0 .. num_classes - 1."""
    if num_classes == len(categories):
        return tuple(category.id for category in categories)
    return tuple(range(num_classes))


def default_class_names(num_classes: int, categories: Sequence[Category]) -> Tuple[str, ...]:
    """Names of a checkpoint's classes when it does not record them: those of ``categories`` when the counts agree,
    else ``class_0`` ... (and the model card should name them)."""
    if num_classes == len(categories):
        return tuple(category.name for category in categories)
    return tuple(f"class_{index}" for index in range(num_classes))


# ADE20K SceneParsing (ADEChallengeData2016), 150 classes in label-value order (value v = class v - 1), the names of
# CSAILVision/sceneparsing ``objectInfo150.csv`` as detectron2's ``ADE20K_SEM_SEG_CATEGORIES`` lists them.
ADE20K_CLASSES: Tuple[str, ...] = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road, route', 'bed', 'window', 'grass', 'cabinet',
    'sidewalk, pavement', 'person', 'earth, ground', 'door', 'table', 'mountain, mount', 'plant', 'curtain', 'chair',
    'car', 'water', 'painting, picture', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair',
    'seat', 'fence', 'desk', 'rock, stone', 'wardrobe, closet, press', 'lamp', 'tub', 'rail', 'cushion',
    'base, pedestal, stand', 'box', 'column, pillar', 'signboard, sign', 'chest of drawers, chest, bureau, dresser',
    'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator, icebox', 'grandstand, covered stand',
    'path', 'stairs', 'runway', 'case, display case, showcase, vitrine', 'pool table, billiard table, snooker table',
    'pillow', 'screen door, screen', 'stairway, staircase', 'river', 'bridge, span', 'bookcase', 'blind, screen',
    'coffee table', 'toilet, can, commode, crapper, pot, potty, stool, throne', 'flower', 'book', 'hill', 'bench',
    'countertop', 'stove', 'palm, palm tree', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar',
    'arcade machine', 'hovel, hut, hutch, shack, shanty', 'bus', 'towel', 'light', 'truck', 'tower', 'chandelier',
    'awning, sunshade, sunblind', 'street lamp', 'booth', 'tv', 'plane', 'dirt track', 'clothes', 'pole',
    'land, ground, soil', 'bannister, banister, balustrade, balusters, handrail',
    'escalator, moving staircase, moving stairway', 'ottoman, pouf, pouffe, puff, hassock', 'bottle',
    'buffet, counter, sideboard', 'poster, posting, placard, notice, bill, card', 'stage', 'van', 'ship', 'fountain',
    'conveyer belt, conveyor belt, conveyer, conveyor, transporter', 'canopy',
    'washer, automatic washer, washing machine', 'plaything, toy', 'pool', 'stool', 'barrel, cask',
    'basket, handbasket', 'falls', 'tent', 'bag', 'minibike, motorbike', 'cradle', 'oven', 'ball',
    'food, solid food', 'step, stair', 'tank, storage tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle',
    'lake', 'dishwasher', 'screen', 'blanket, cover', 'sculpture', 'hood, exhaust hood', 'sconce', 'vase',
    'traffic light', 'tray', 'trash can', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board',
    'shower', 'radiator', 'glass, drinking glass', 'clock', 'flag',
)
# The same 150 classes as Hugging Face's ADE20K checkpoints name them in ``id2label`` (huggingface/label-files
# ``ade20k-id2label.json``: one synonym each, e.g. 'windowpane' for 'window', 'bathtub' for 'tub').
ADE20K_HF_CLASSES: Tuple[str, ...] = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path',
    'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase',
    'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light',
    'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane',
    'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool',
    'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture',
    'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag',
)
# ADE20K's 100 thing classes (indices into ADE20K_CLASSES), the ``isthing`` flags of detectron2's ADE20K panoptic
# registration (ADEChallengeData2016's panoptic annotations), which Mask2Former / OneFormer ADE20K panoptic models use.
ADE20K_THING_INDICES: Tuple[int, ...] = (
    7, 8, 10, 12, 14, 15, 18, 19, 20, 22, 23, 24, 27, 30, 31, 32, 33, 35, 36, 37, 38, 39, 41, 42, 43, 44, 45, 47, 49,
    50, 53, 55, 56, 57, 58, 62, 64, 65, 66, 67, 69, 70, 71, 72, 73, 74, 75, 76, 78, 80, 81, 82, 83, 85, 86, 87, 88,
    89, 90, 92, 93, 95, 97, 98, 102, 103, 104, 107, 108, 110, 111, 112, 115, 116, 118, 119, 120, 121, 123, 124, 125,
    126, 127, 129, 130, 132, 133, 134, 135, 136, 137, 138, 139, 142, 143, 144, 146, 147, 148, 149,
)
# Cityscapes: the 19 evaluated classes in train-id order (semantic), and the 8 instance classes with their label ids.
CITYSCAPES_CLASSES: Tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation", "terrain",
    "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_THING_INDICES: Tuple[int, ...] = tuple(range(11, 19))  # person .. bicycle: Cityscapes' instance classes
CITYSCAPES_INSTANCE_CATEGORIES: List[Category] = [
    Category(24, "person", True, (220, 20, 60)), Category(25, "rider", True, (255, 0, 0)),
    Category(26, "car", True, (0, 0, 142)), Category(27, "truck", True, (0, 0, 70)),
    Category(28, "bus", True, (0, 60, 100)), Category(31, "train", True, (0, 80, 100)),
    Category(32, "motorcycle", True, (0, 0, 230)), Category(33, "bicycle", True, (119, 11, 32)),
]


class ClassTable(NamedTuple):
    """A built-in class set: what a checkpoint that records only its class count is taken to have been trained on."""

    dataset: str
    class_names: Tuple[str, ...]
    category_ids: Tuple[int, ...]
    num_things_classes: int
    """The first ``num_things_classes`` classes are things (the rest stuff), as post-processing expects."""
    task: str
    """What checkpoints trained on it answer by default."""
    thing_indices: Tuple[int, ...]
    """The classes that are things in the dataset's panoptic annotations (``isthing``), in class order; where they
    are not the first ``num_things_classes``, ``classes.things_first`` moves them first for panoptic / instance."""


BUILTIN_CLASS_TABLES: Tuple[ClassTable, ...] = (
    ClassTable("COCO panoptic", tuple(c.name for c in COCO_PANOPTIC_CATEGORIES),
               tuple(c.id for c in COCO_PANOPTIC_CATEGORIES), len(COCO_THING_CATEGORIES), "panoptic",
               tuple(range(len(COCO_THING_CATEGORIES)))),
    ClassTable("COCO instance", tuple(c.name for c in COCO_THING_CATEGORIES),
               tuple(c.id for c in COCO_THING_CATEGORIES), len(COCO_THING_CATEGORIES), "instance",
               tuple(range(len(COCO_THING_CATEGORIES)))),
    ClassTable("ADE20K", ADE20K_CLASSES, tuple(range(len(ADE20K_CLASSES))), 0, "semantic", ADE20K_THING_INDICES),
    ClassTable("ADE20K", ADE20K_HF_CLASSES, tuple(range(len(ADE20K_CLASSES))), 0, "semantic", ADE20K_THING_INDICES),
    ClassTable("Cityscapes", CITYSCAPES_CLASSES, tuple(range(len(CITYSCAPES_CLASSES))), 0, "semantic",
               CITYSCAPES_THING_INDICES),
    ClassTable("Cityscapes instance", tuple(c.name for c in CITYSCAPES_INSTANCE_CATEGORIES),
               tuple(c.id for c in CITYSCAPES_INSTANCE_CATEGORIES), len(CITYSCAPES_INSTANCE_CATEGORIES), "instance",
               tuple(range(len(CITYSCAPES_INSTANCE_CATEGORIES)))),
)


def class_table_of_count(num_classes: int) -> Optional[ClassTable]:
    """The built-in class set with ``num_classes`` classes, or None (only one dataset per count: ADE20K's two
    spellings are the same classes)."""
    return next((table for table in BUILTIN_CLASS_TABLES if len(table.class_names) == num_classes), None)


def class_table_of_names(class_names: Sequence[str]) -> Optional[ClassTable]:
    """The built-in class set whose names are ``class_names`` in order (case and surrounding spaces ignored), or
    None."""
    wanted = [name.strip().lower() for name in class_names]
    for table in BUILTIN_CLASS_TABLES:
        if [name.lower() for name in table.class_names] == wanted:
            return table
    return None


def describe_class_tables() -> str:
    """"COCO panoptic (133), COCO instance (80), ..." for messages."""
    described = dict.fromkeys(f"{table.dataset} ({len(table.class_names)})" for table in BUILTIN_CLASS_TABLES)
    return ", ".join(described)


def coco_split_of_count(num_classes: int) -> Tuple[Tuple[int, ...], str, int]:
    """(category ids, default task, number of thing classes) for a Hugging Face EoMT / OneFormer checkpoint, which
    records class names but no thing / stuff split: COCO panoptic (133) and COCO instance (80) by their tables, any
    other count semantic-only with ids 0 .. K - 1."""
    if num_classes == len(COCO_PANOPTIC_CATEGORIES):
        return tuple(c.id for c in COCO_PANOPTIC_CATEGORIES), "panoptic", len(COCO_THING_CATEGORIES)
    if num_classes == len(COCO_THING_CATEGORIES):
        return tuple(c.id for c in COCO_THING_CATEGORIES), "instance", num_classes
    return tuple(range(num_classes)), "semantic", 0
