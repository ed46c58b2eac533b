"""The training sections EasyCV's ``to_ms_config`` writes (the r50 card's recipe) -> this package's trainer keys.

Every key of the sections below is mapped, or ignored with a logged note; any other key (or hook, pipeline step,
evaluator, lr policy) is named in one ``TrainingConfigError`` when the trainer is built.

=========================================  =====================================================================
EasyCV key                                 here
=========================================  =====================================================================
``train.optimizer.{type,lr,weight_decay,   the torch optimizer of that name and arguments (checked against its
eps,betas,...}``                           signature)
``train.optimizer.paramwise_options``      rules by parameter name (a regular expression searched in EasyCV's
                                           name, ``head.pixel_decoder.*`` / ``head.predictor.*``): ``lr_mult``,
                                           ``weight_decay``, ``decay_mult`` / ``weight_decay_mult``, ``lr``
``train.optimizer.options.grad_clip``      gradient clipping by the total norm (ModelScope's ``OptimizerHook``)
``train.lr_scheduler`` ``{policy, ...}``   ``training.lr_policy.PolicyLR``: ``step`` / ``poly`` / ``cosine``
                                           (mmcv's ``CosineAnnealing``) / ``fixed``, warmup ``constant`` /
                                           ``linear`` / ``exp`` by iteration or epoch, ``by_epoch``
``train.hooks``                            ``CheckpointHook`` (this package's), ``EvaluationHook``,
                                           ``IterTimerHook``, ``TextLoggerHook`` (ModelScope's, same arguments);
                                           ``AddLrLogHook``: ignored, logged (ModelScope's ``LrSchedulerHook``
                                           logs the lr); other hooks ModelScope registers pass through
``train.{max_epochs,work_dir,dataloader}`` ModelScope's meaning (``dataloader``: ``batch_size_per_gpu``,
                                           ``workers_per_gpu``)
``evaluation.metrics`` ``EasyCVMetric``    ``CocoPanopticEvaluator`` -> PQ, ``CocoDetectionEvaluator`` -> box
                                           AP, ``CocoMaskEvaluator`` -> mask AP (ground truth: the val data
                                           source's ``ann_file``); ``classes``: compared with the training
                                           categories, a difference logged
``evaluation.dataloader``                  ignored, logged (evaluation runs image by image)
``dataset.{train,val}.type`` DetDataset    ``integration.datasets.CocoPanopticDetDataset``
``data_source`` DetSourceCocoPanoptic      ``pan_ann_file``, ``seg_prefix``, ``img_prefix`` (the reader),
                                           ``ann_file`` (instance ground truth), ``${data_root}`` = the split
                                           folder; ``thing_classes`` / ``stuff_classes``: the annotation file's
                                           categories decide, a difference logged; ``filter_empty_gt`` (images
                                           without a thing left out, training only); ``iscrowd`` (crowd objects
                                           are never training targets; evaluation keeps them as COCO's ignored
                                           regions; ``iscrowd: true`` for training is logged);
                                           ``test_mode``; ``outfile_prefix``: ignored, logged
``data_source.pipeline``                   ``LoadImageFromFile``, ``LoadPanopticAnnotations``: the reader
``dataset.train.pipeline``                 ``MMRandomFlip`` (``flip_ratio``) -> ``flip_probability``;
                                           ``MMResize`` (square ``img_scale`` S, ``ratio_range`` (a, b),
                                           ``multiscale_mode`` range, ``keep_ratio``) -> large-scale jitter of
                                           ``image_size`` S, scales a..b; ``MMRandomCrop`` (square
                                           ``crop_size``, ``absolute``) -> ``crop_size``; ``MMNormalize`` (must
                                           equal the model's); ``MMPad`` (``size`` = the crop); formatting steps
                                           (``DefaultFormatBundle``, ``Collect``, ``ImageToTensor``): this
                                           package's collate
``dataset.val.pipeline``                   the model's test-time preprocessing (read when the model loads);
                                           ``MMMultiScaleFlipAug`` with ``flip: true`` is refused
``dataset.{train,val}.imgs_per_gpu`` /     ignored, logged (``train.dataloader`` decides)
``workers_per_gpu``
``model.train_cfg``                        ``train.loss``: ``class_weight``, ``mask_weight``, ``dice_weight``,
                                           ``no_object_weight``, ``num_points``, ``oversample_ratio``,
                                           ``importance_sample_ratio``; ``deep_supervision`` (always on here;
                                           false is refused); ``dec_layers`` (must be the decoder's layers + 1)
=========================================  =====================================================================

Explicit ``train.loss`` / ``train.augmentation`` keys (this package's) override what is read from the EasyCV keys.
"""
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from modelscope_plugin.errors import TrainingConfigError
from modelscope_plugin.evaluation.metrics import COCO_INSTANCE_METRIC, PANOPTIC_QUALITY_METRIC
from modelscope_plugin.integration.datasets import DATA_SOURCE_TYPE, DATASET_TYPE, PanopticDataSource
from modelscope_plugin.model_dirs.configuration import decode_easycv_tuples
from modelscope_plugin.training.lr_policy import lr_policy_from
from modelscope_plugin.training.optimizer import parameter_rules_from

EASYCV_DATASET_TYPE = "DetDataset"
# the train.* keys EasyCV writes, and those of ModelScope and of this package that this trainer reads
TRAIN_KEYS = {"work_dir", "max_epochs", "dataloader", "optimizer", "lr_scheduler", "hooks", "train_iters_per_epoch",
              "checkpoint", "logging", "loss", "augmentation", "preprocess", "task", "categories"}
DATALOADER_KEYS = {"batch_size_per_gpu", "workers_per_gpu", "shuffle"}
OPTIMIZER_OPTION_KEYS = {"grad_clip", "cumulative_iters"}
GRAD_CLIP_KEYS = {"max_norm", "norm_type"}
EVALUATION_KEYS = {"dataloader", "metrics", "period"}
DATASET_SPLIT_KEYS = {"type", "data_source", "pipeline", "imgs_per_gpu", "workers_per_gpu"}
# EasyCV hook -> ModelScope's hook of the same behaviour (None: dropped, with the reason logged)
HOOKS = {"CheckpointHook": "CheckpointHook", "EvaluationHook": "EvaluationHook", "IterTimerHook": "IterTimerHook",
         "TextLoggerHook": "TextLoggerHook", "AddLrLogHook": None}
DROPPED_HOOK_REASONS = {"AddLrLogHook": "ModelScope's LrSchedulerHook logs the learning rate"}
# EasyCV evaluator -> this package's metric configuration
EVALUATORS = {"CocoPanopticEvaluator": {"type": PANOPTIC_QUALITY_METRIC},
              "CocoDetectionEvaluator": {"type": COCO_INSTANCE_METRIC, "iou_types": ["bbox"]},
              "CocoMaskEvaluator": {"type": COCO_INSTANCE_METRIC, "iou_types": ["segm"]}}
LOSS_KEYS = {"class_weight": "class_weight", "mask_weight": "mask_weight", "dice_weight": "dice_weight",
             "no_object_weight": "no_object_weight", "num_points": "num_points",
             "oversample_ratio": "oversample_ratio", "importance_sample_ratio": "importance_sample_ratio"}
FORMATTING_STEPS = {"DefaultFormatBundle", "Collect", "ImageToTensor"}
LOADING_STEPS = {"LoadImageFromFile": {"to_float32", "color_type", "file_client_args"},
                 "LoadPanopticAnnotations": {"with_bbox", "with_label", "with_mask", "with_seg", "file_client_args"}}
# train pipeline step -> its keys
TRAIN_STEP_KEYS = {"MMRandomFlip": {"flip_ratio", "direction"},
                   "MMResize": {"img_scale", "ratio_range", "multiscale_mode", "keep_ratio"},
                   "MMRandomCrop": {"crop_size", "crop_type", "recompute_bbox", "allow_negative_crop"},
                   "MMNormalize": {"mean", "std", "to_rgb"},
                   "MMPad": {"size", "size_divisor", "pad_val"}}
TEST_STEP_KEYS = {"MMMultiScaleFlipAug": {"img_scale", "flip", "transforms", "flip_direction"},
                  "MMResize": {"keep_ratio", "img_scale"}, "MMRandomFlip": {"flip_ratio", "direction"},
                  "MMNormalize": {"mean", "std", "to_rgb"}, "MMPad": {"size_divisor", "pad_val"}}


@dataclass
class EasyCVRecipe:
    """What the EasyCV-written sections become."""

    train: Dict[str, Any]
    """``train.*`` keys in this package's form (replacing the configuration's ``train`` section)."""
    evaluation: Dict[str, Any]
    datasets: Dict[str, Dict[str, Any]]
    """``dataset.{train,val}`` sections, typed for ``CocoPanopticDetDataset``."""
    notes: List[str] = field(default_factory=list)
    decoder_stages: Optional[int] = None
    """``model.train_cfg.dec_layers``: the predictions supervised (decoder layers + 1)."""
    normalize: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None
    """The train pipeline's ``MMNormalize`` (mean, std)."""
    evaluator_classes: Dict[str, List[str]] = field(default_factory=dict)


def _unknown(values: Mapping[str, Any], known, where: str, problems: List[str]) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} (known: {sorted(known)})")


def _square(value: Any, where: str, problems: List[str]) -> Optional[int]:
    """An int, or a (side, side) pair (EasyCV writes tuples; a list of one pair too) -> the side."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    problems.append(f"{where}: {value!r} is not a square size (this package trains on square crops)")
    return None


def _hooks(hooks: Sequence[Mapping[str, Any]], known_elsewhere, notes: List[str], problems: List[str]) -> List[dict]:
    translated = []
    for index, hook in enumerate(hooks or []):
        hook = dict(hook)
        hook_type = hook.get("type")
        if hook_type in HOOKS:
            if HOOKS[hook_type] is None:
                notes.append(f"train.hooks[{index}] {hook_type}: ignored ({DROPPED_HOOK_REASONS[hook_type]})")
                continue
            translated.append(dict(hook, type=HOOKS[hook_type]))
        elif known_elsewhere(hook_type):
            translated.append(hook)
        else:
            problems.append(f"train.hooks[{index}]: {hook_type!r} is neither an EasyCV hook this package maps "
                            f"({sorted(HOOKS)}) nor a ModelScope hook")
    return translated


def _optimizer(values: Mapping[str, Any], problems: List[str]) -> Dict[str, Any]:
    optimizer = dict(values)
    optimizer_class = getattr(torch.optim, str(optimizer.get("type")), None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        problems.append(f"train.optimizer.type {optimizer.get('type')!r} is not a torch.optim optimizer")
    else:
        accepted = set(inspect.signature(optimizer_class.__init__).parameters) - {"self", "params"}
        _unknown(optimizer, accepted | {"type", "options", "paramwise_options"},
                 f"train.optimizer ({optimizer_class.__name__})", problems)
    options = dict(optimizer.get("options") or {})
    _unknown(options, OPTIMIZER_OPTION_KEYS, "train.optimizer.options", problems)
    if options.get("grad_clip"):
        _unknown(options["grad_clip"], GRAD_CLIP_KEYS, "train.optimizer.options.grad_clip", problems)
    try:
        parameter_rules_from(optimizer.get("paramwise_options", {}))
    except TrainingConfigError as error:
        problems.append(str(error))
    if isinstance(optimizer.get("betas"), list):
        optimizer["betas"] = tuple(optimizer["betas"])
    return optimizer


def _train_pipeline(steps: Sequence[Mapping[str, Any]], notes: List[str], problems: List[str]):
    """Train pipeline -> (augmentation keys, (mean, std) or None)."""
    augmentation: Dict[str, Any] = {"kind": "large_scale_jitter", "min_scale": 1.0, "max_scale": 1.0,
                                    "flip_probability": 0.0}
    normalize, pad_size = None, None
    for index, step in enumerate(steps or []):
        step = dict(step)
        step_type = step.pop("type", None)
        where = f"dataset.train.pipeline[{index}] {step_type}"
        if step_type in FORMATTING_STEPS:
            continue
        if step_type not in TRAIN_STEP_KEYS:
            problems.append(f"dataset.train.pipeline[{index}]: step {step_type!r} is not mapped (mapped: "
                            f"{sorted(TRAIN_STEP_KEYS) + sorted(FORMATTING_STEPS)})")
            continue
        _unknown(step, TRAIN_STEP_KEYS[step_type], where, problems)
        if step_type == "MMRandomFlip":
            if step.get("direction", "horizontal") != "horizontal":
                problems.append(f"{where}: direction {step['direction']!r} (only horizontal flips)")
            augmentation["flip_probability"] = float(step.get("flip_ratio") or 0.0)
        elif step_type == "MMResize":
            if step.get("keep_ratio", True) is not True:
                problems.append(f"{where}: keep_ratio false (resizing keeps the aspect ratio here)")
            if step.get("ratio_range") is not None and step.get("multiscale_mode", "range") != "range":
                problems.append(f"{where}: multiscale_mode {step['multiscale_mode']!r} (only range)")
            side = _square(step.get("img_scale"), f"{where} img_scale", problems)
            if side is not None:
                augmentation["image_size"] = side
            if step.get("ratio_range") is not None:
                augmentation["min_scale"], augmentation["max_scale"] = (float(value) for value in step["ratio_range"])
        elif step_type == "MMRandomCrop":
            if step.get("crop_type", "absolute") != "absolute":
                problems.append(f"{where}: crop_type {step['crop_type']!r} (only absolute)")
            side = _square(step.get("crop_size"), f"{where} crop_size", problems)
            if side is not None:
                augmentation["crop_size"] = side
        elif step_type == "MMNormalize":
            if step.get("to_rgb") is False:
                problems.append(f"{where}: to_rgb false (images are normalised as RGB)")
            normalize = (tuple(float(value) for value in step["mean"]), tuple(float(value) for value in step["std"]))
        elif step_type == "MMPad":
            if step.get("size") is not None:
                pad_size = _square(step["size"], f"{where} size", problems)
            if step.get("pad_val") not in (None, 0):
                notes.append(f"{where}: pad_val ignored (padding is train.augmentation.pad_value before normalising)")
    crop = augmentation.get("crop_size") or augmentation.get("image_size")
    if pad_size is not None and crop is not None and pad_size != crop:
        problems.append(f"dataset.train.pipeline: MMPad size {pad_size} is not the crop size {crop} (this package "
                        "pads each crop to its own size)")
    if augmentation.get("crop_size") == augmentation.get("image_size"):
        augmentation.pop("crop_size", None)
    return augmentation, normalize


def _test_pipeline(steps: Sequence[Mapping[str, Any]], where: str, problems: List[str]) -> None:
    for index, step in enumerate(steps or []):
        step = dict(step)
        step_type = step.pop("type", None)
        step_where = f"{where}[{index}] {step_type}"
        if step_type in FORMATTING_STEPS:
            continue
        if step_type not in TEST_STEP_KEYS:
            problems.append(f"{where}[{index}]: step {step_type!r} is not mapped (mapped: "
                            f"{sorted(TEST_STEP_KEYS) + sorted(FORMATTING_STEPS)})")
            continue
        _unknown(step, TEST_STEP_KEYS[step_type], step_where, problems)
        if step_type == "MMMultiScaleFlipAug":
            if step.get("flip"):
                problems.append(f"{step_where}: flip true (test-time flipping is not supported)")
            _test_pipeline(step.get("transforms", []), f"{step_where}.transforms", problems)


def _dataset(split: str, values: Mapping[str, Any], notes: List[str], problems: List[str]):
    """A ``dataset.{split}`` section -> (this package's section, augmentation or None, normalize or None)."""
    where = f"dataset.{split}"
    values = dict(values)
    _unknown(values, DATASET_SPLIT_KEYS, where, problems)
    if values.get("type") not in (EASYCV_DATASET_TYPE, DATASET_TYPE):
        problems.append(f"{where}.type {values.get('type')!r} is not {EASYCV_DATASET_TYPE}")
    for key in ("imgs_per_gpu", "workers_per_gpu"):
        if key in values:
            notes.append(f"{where}.{key}: ignored (train.dataloader / the evaluation decide)")
    source = dict(values.get("data_source") or {})
    if source.get("type", DATA_SOURCE_TYPE) != DATA_SOURCE_TYPE:
        problems.append(f"{where}.data_source.type {source.get('type')!r} is not {DATA_SOURCE_TYPE}")
    _unknown({key: value for key, value in source.items() if key != "type"},
             PanopticDataSource.__dataclass_fields__, f"{where}.data_source", problems)
    for index, step in enumerate(source.get("pipeline") or []):
        step = dict(step)
        step_type = step.pop("type", None)
        if step_type not in LOADING_STEPS:
            problems.append(f"{where}.data_source.pipeline[{index}]: step {step_type!r} is not mapped (mapped: "
                            f"{sorted(LOADING_STEPS)})")
        else:
            _unknown(step, LOADING_STEPS[step_type], f"{where}.data_source.pipeline[{index}] {step_type}", problems)
    if source.get("outfile_prefix"):
        notes.append(f"{where}.data_source.outfile_prefix: ignored (no result files are written)")
    if split == "train" and source.get("iscrowd"):
        notes.append(f"{where}.data_source.iscrowd true: crowd objects are still not training targets here")
    augmentation, normalize = None, None
    if split == "train":
        augmentation, normalize = _train_pipeline(values.get("pipeline"), notes, problems)
    else:
        _test_pipeline(values.get("pipeline"), f"{where}.pipeline", problems)
    section = {key: value for key, value in values.items() if key in ("data_source", "pipeline")}
    section["type"] = DATASET_TYPE
    return section, augmentation, normalize


def _evaluation(values: Mapping[str, Any], notes: List[str], problems: List[str]):
    """``evaluation`` -> (this package's section, evaluator type -> classes)."""
    evaluation = dict(values)
    _unknown(evaluation, EVALUATION_KEYS, "evaluation", problems)
    if "dataloader" in evaluation:
        notes.append("evaluation.dataloader: ignored (evaluation runs image by image)")
        evaluation.pop("dataloader")
    metrics = evaluation.get("metrics")
    classes: Dict[str, List[str]] = {}
    if isinstance(metrics, Mapping) and metrics.get("type") == "EasyCVMetric":
        _unknown(metrics, {"type", "evaluators"}, "evaluation.metrics", problems)
        translated = []
        for index, evaluator in enumerate(metrics.get("evaluators") or []):
            evaluator = dict(evaluator)
            evaluator_type = evaluator.pop("type", None)
            if evaluator_type not in EVALUATORS:
                problems.append(f"evaluation.metrics.evaluators[{index}]: {evaluator_type!r} is not mapped "
                                f"(mapped: {sorted(EVALUATORS)})")
                continue
            _unknown(evaluator, {"classes"}, f"evaluation.metrics.evaluators[{index}] {evaluator_type}", problems)
            if evaluator.get("classes") is not None:
                classes[evaluator_type] = list(evaluator["classes"])
            translated.append(dict(EVALUATORS[evaluator_type]))
        if not translated and not problems:
            problems.append("evaluation.metrics: EasyCVMetric without evaluators")
        evaluation["metrics"] = translated
    return evaluation, classes


def _loss(train_cfg: Mapping[str, Any], problems: List[str]):
    """``model.train_cfg`` -> (``train.loss`` keys, decoder stages or None)."""
    train_cfg = dict(train_cfg or {})
    _unknown(train_cfg, set(LOSS_KEYS) | {"deep_supervision", "dec_layers"}, "model.train_cfg", problems)
    if train_cfg.get("deep_supervision", True) is not True:
        problems.append("model.train_cfg.deep_supervision false (every decoder stage is supervised here)")
    loss = {LOSS_KEYS[key]: value for key, value in train_cfg.items() if key in LOSS_KEYS}
    return loss, train_cfg.get("dec_layers")


def read_easycv_recipe(configuration: Mapping[str, Any], known_hook=lambda name: False) -> EasyCVRecipe:
    """The EasyCV-written sections of ``configuration`` (a plain dict; EasyCV's encoded tuples decoded) in this
    package's form, per the module
    docstring's table; ``known_hook(name)``: whether ModelScope registers a hook of that name. Raises one
    ``TrainingConfigError`` listing every key, step, hook or evaluator it cannot map."""
    configuration = decode_easycv_tuples(dict(configuration))
    notes: List[str] = []
    problems: List[str] = []
    train = dict(configuration.get("train") or {})
    _unknown(train, TRAIN_KEYS, "train", problems)
    _unknown(train.get("dataloader") or {}, DATALOADER_KEYS, "train.dataloader", problems)
    if "optimizer" in train:
        train["optimizer"] = _optimizer(train["optimizer"], problems)
    scheduler = train.get("lr_scheduler")
    if isinstance(scheduler, Mapping) and "policy" in scheduler:
        try:
            lr_policy_from(scheduler)
        except TrainingConfigError as error:
            problems.append(str(error))
    if "hooks" in train:
        train["hooks"] = _hooks(train["hooks"], known_hook, notes, problems)
    datasets, augmentation, normalize = {}, None, None
    for split, values in (configuration.get("dataset") or {}).items():
        if split not in ("train", "val"):
            problems.append(f"dataset.{split}: only train and val are read")
            continue
        datasets[split], split_augmentation, split_normalize = _dataset(split, values, notes, problems)
        if split == "train":
            augmentation, normalize = split_augmentation, split_normalize
    if augmentation is not None:
        train["augmentation"] = dict(augmentation, **(train.get("augmentation") or {}))
    loss, decoder_stages = _loss((configuration.get("model") or {}).get("train_cfg"), problems)
    if loss:
        train["loss"] = dict(loss, **(train.get("loss") or {}))
    evaluation, evaluator_classes = _evaluation(configuration.get("evaluation") or {}, notes, problems)
    if problems:
        raise TrainingConfigError("the EasyCV training configuration cannot be used: " + "; ".join(problems))
    return EasyCVRecipe(train=train, evaluation=evaluation, datasets=datasets, notes=notes,
                        decoder_stages=decoder_stages, normalize=normalize, evaluator_classes=evaluator_classes)
