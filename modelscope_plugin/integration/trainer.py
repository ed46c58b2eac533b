"""ModelScope trainer for this package's Mask2Former, FastInst, EoMT and OneFormer:
``build_trainer('mask2former-segmentation', dict(model=<dir, checkpoint or hub id>, train_dataset=MsDataset,
eval_dataset=MsDataset, work_dir=..., cfg_options={...}))``.

An EoMT (a Hugging Face EoMT folder, or one with a configuration.json of model type "eomt") trains with EoMT's recipe
(``training/eomt.py``): Mask2Former's criterion on the final and every query block's prediction, layer-wise lr decay
groups (``train.optimizer.layer_decay``, default 0.8; ``paramwise_options`` are refused), AdamW 1e-4, weight decay
0.05, no gradient clipping, and the official schedule per iteration (``train.lr_scheduler`` of type
``EomtWarmupPolyLR`` {warmup: [500, 1000], scaled to a run shorter than 15000 iterations unless given (an explicit
one must end before the run does), power: 0.9, total_iters: the run's}: the parts outside the ViT warm up
linearly first, then the ViT, then polynomial decay; any other scheduler may replace it); masked attention annealed
by the trainer's iteration, which queries keep their masks drawn per image from (seed, iteration, position in the
global batch) (``EomtMaskAnnealingHook``; ``train.mask_annealing`` {starts, ends, power}, default the
official placement over the run, which needs at least query blocks + 2 iterations: checked when the trainer is
built), so a resumed run continues both schedules; the training crop is the network's square ``image_size``. Its output
folder holds the HF files (``config.json`` + ``model.safetensors``) and a configuration.json with its classes.

A OneFormer (a Hugging Face OneFormer folder, or one with a configuration.json of model type "oneformer") trains on
rows of any kind with a task per image (``training/oneformer.py``): on panoptic rows drawn as the reference draws it
(seeded by seed, epoch and image, so independent of ranks and resumes); instance rows train the instance task alone
(the class head then covers the thing classes), label rows the semantic task alone, which also becomes the default
task (a configured ``train.task`` they cannot train raises ``TrainingConfigError``); that task's targets and text
list ("a photo with a {class}", tokenised by the package's CLIP tokenizer), and ``OneFormerCriterion``
(transformers' OneFormerLoss; ``train.loss.contrastive_weight`` / ``contrastive_temperature``; its learned logit
scale is optimised with the network, without weight decay); otherwise the class head covers every class whatever
``train.task`` (the default inference task). A folder without a text mapper
(an inference checkpoint, ``is_training`` false) trains without the contrastive term, as transformers does (logged).
Its output folder holds the HF files (``config.json`` with ``is_training`` and the text mapper when there is one,
``model.safetensors``, ``preprocessor_config.json``) and a configuration.json with its classes.

A FastInst model directory (``model.type`` "fastinst") trains the instance task with ``FastInstCriterion`` (location
cost, proposal loss, ground-truth mask-guided learning) and official FastInst's defaults (AdamW 1e-4, weight decay
0.05, no gradient clipping, lr x 0.1 at 88.9 % and 96.3 % of the iterations; its multi-scale resize + random crop
augmentation, ``train.augmentation.kind`` "fastinst"); its output folder is a hub-layout FastInst directory.

It is ModelScope's ``EpochBasedTrainer`` (its configuration keys, hooks, log and checkpoint names) with the gaps
that keep the stock trainer from finetuning these models closed:

================================  ===================================================================================
stock behaviour                   here
================================  ===================================================================================
local model dir: asks the hub      ``get_or_download_model_dir`` never queries the hub for a local directory; hub ids
whether it is the latest           resolve through this package's cache-first resolver
``launcher='pytorch'`` = CUDA      ``SegmentationDDPHook``: gloo on CPU, NCCL on GPU; DDP without ``device_ids`` on CPU
+ NCCL (``DDPHook``)
resume fails on torch >= 2.6       ``SegmentationCheckpointHook``: every rank's RNG state in ``weights_only``-loadable
(numpy RNG state vs weights_only)  types, counters that resume where the run stopped, native model dir in
                                   ``{work_dir}/output``
every rank seeded with ``seed``:   rank r > 0 re-seeds with seed + r when training starts (detectron2's seed + rank),
the same drop path / dropout       so each rank's images get their own drop path / dropout masks; rank 0 keeps the
masks on every rank                stream seeded with ``seed``, so one process trains as before
one parameter group                ``train.optimizer.paramwise_options``: backbone lr x 0.1, no weight decay on norms,
                                   embeddings and Swin position tables (detectron2 Mask2Former); or EasyCV's rules by
                                   parameter name (``{pattern: {lr_mult, weight_decay, decay_mult, ...}}``)
EasyCV's ``lr_scheduler``          ``{policy: step | poly | cosine | fixed, warmup, ...}`` (mmcv's formulas,
``{policy: ...}`` fails            ``training.lr_policy.PolicyLR``); the default scheduler is merged only where the
(PolynomialLR merged in)           configuration has none
``build_dataset`` prints a dataset an ``MsDataset`` of a hub archive is read by ``to_custom_dataset`` through the
error and goes on                  ``dataset.{train,val}`` section (``integration.datasets``); its errors surface
the 2nd trainer of a process has   each trainer its own copy of ModelScope's default hooks (``update_cfg`` empties
no default CheckpointHook /        the shared ``DEFAULT_HOOKS_CONFIG`` dicts)
TextLoggerHook
distributed eval pads with         each image scored once, metric objects merged across ranks
duplicate images
``strict=False`` class heads       a different ``train.categories`` re-initialises the class head, logged
================================  ===================================================================================

A checkpoint without a configuration.json (a Hugging Face folder, an EasyCV export, a FastInst release file, a
detectron2 ``.pkl``; ``class_names=`` / ``thing_ids=`` where it records none) is first written as a model directory
under ``{work_dir}/input_model`` (``model_directory_for_training``), which the trainer then reads.

Configuration (``configuration.json`` of the model dir, then ``cfg_options``; defaults in ``DEFAULT_TRAINING_CONFIG``):
``train.max_epochs``, ``train.train_iters_per_epoch``, ``train.dataloader.{batch_size_per_gpu,workers_per_gpu}``,
``train.optimizer`` (torch.optim name + arguments, ``options.grad_clip``, ``paramwise_options``),
``train.lr_scheduler`` (torch.optim.lr_scheduler name + arguments, ``options.by_epoch``), ``train.hooks`` /
``train.checkpoint.period`` / ``train.logging`` / ``evaluation.period``, ``train.loss`` (``LossConfig``),
``train.augmentation`` (``AugmentationConfig``), ``train.preprocess`` (``PreprocessConfig`` fields: test-time
resize of the finetuned model), ``train.task`` (panoptic / instance / semantic),
``train.categories`` (COCO category dicts; default: the model's classes), ``evaluation.metrics``.
Datasets: rows of ``modelscope_plugin.data.datasets.read_coco_panoptic`` (any task), ``read_coco_instances``
(instance) or ``read_label_folders`` (semantic), or an ``MsDataset`` of them; or what ``MsDataset.load`` returns for a
hub dataset shipped as an archive, read through a ``dataset.{train,val}`` section of type
``mask2former-coco-panoptic-dataset`` (its categories are the training categories unless given). Rows that cannot
train ``train.task`` raise ``TrainingDataError`` when the trainer is built (a OneFormer's: ``TrainingConfigError``).
``cfg_options`` are merged before the configuration is read. The r50 card's EasyCV-written sections:
``build_trainer('easycv', ...)`` (``integration.easycv_trainer``).
"""
import os
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from modelscope.metrics import build_metric
from modelscope.msdatasets.dataset_cls import ExternalDataset
from modelscope.msdatasets.ms_dataset import MsDataset
from modelscope.trainers.builder import TRAINERS
from modelscope.trainers.default_config import DEFAULT_HOOKS_CONFIG
from modelscope.trainers.trainer import EpochBasedTrainer
from modelscope.utils.config import ConfigDict
from modelscope.utils.constant import ModeKeys, TrainerStages
from torch.utils.data import DataLoader

from modelscope_plugin.config import EomtConfig, FastInstConfig, OneFormerConfig, PreprocessConfig
from modelscope_plugin.errors import TrainingConfigError, TrainingDataError
from modelscope_plugin.evaluation.metrics import COCO_INSTANCE_METRIC, PANOPTIC_QUALITY_METRIC, SEMANTIC_METRIC
from modelscope_plugin.integration import hub
from modelscope_plugin.integration.datasets import (
    DATASET_TYPE,
    CocoPanopticDetDataset,
    annotation_categories,
    data_root_of,
    panoptic_data_source,
)
from modelscope_plugin.model_dirs.configuration import synthesized_configuration
from modelscope_plugin.model_dirs.load import load_model, load_model_dir
from modelscope_plugin.modeling.criterion import Mask2FormerCriterion
from modelscope_plugin.modeling.fastinst.criterion import FastInstCriterion
from modelscope_plugin.modeling.matcher import HungarianMatcher
from modelscope_plugin.modeling.oneformer.criterion import OneFormerCriterion, OneFormerTrainingOutput
from modelscope_plugin.modeling.point_sampling import PointSampler
from modelscope_plugin.ranks import rank_and_world_size
from modelscope_plugin.training import amp, distributed  # noqa: F401  (register SegmentationAMPOptimizerHook, SegmentationDDPHook)
from modelscope_plugin.training.checkpoint import SegmentationLoadCheckpointHook, seed_rank_rng, write_output_dir
from modelscope_plugin.training.class_head import adapt_class_head
from modelscope_plugin.training.config import AugmentationConfig, LossConfig, settings_from
from modelscope_plugin.training.data import (
    TASKS_OF_ROW_KIND,
    GlobalBatchSampler,
    PositionedDataset,
    SegmentationTrainingDataset,
    TrainingBatch,
    TrainingCategory,
    collate,
    contiguous_categories,
    point_seed,
    row_kind,
)
from modelscope_plugin.training.eomt import (
    EOMT_SCHEDULER_TYPE,
    OFFICIAL_WARMUP,
    WARMUP_SCALING_STEPS,
    EomtMaskAnnealingHook,
    MaskAnnealing,
    build_eomt_scheduler,
    build_layer_decay_optimizer,
    eomt_schedule_from,
    mask_draw_seed,
    seeded_mask_draws,
)
from modelscope_plugin.training.evaluation import evaluate_network, flat_metric_values
from modelscope_plugin.training.lr_policy import PolicyLR, lr_policy_from
from modelscope_plugin.training.oneformer import OneFormerTrainingDataset, trainable_tasks
from modelscope_plugin.training.optimizer import build_optimizer, parameter_rules_from

TRAINER_NAME = "mask2former-segmentation"
# ModelScope's default hooks (DEFAULT_HOOKS_CONFIG). Its merge_cfg puts that very list into each trainer's
# configuration and update_cfg then empties the dicts it moves to key chains, so every later trainer of the process
# would run without a CheckpointHook or TextLoggerHook; each trainer here gets its own copy of these instead.
STOCK_DEFAULT_HOOKS = [{"type": "CheckpointHook", "interval": 1}, {"type": "TextLoggerHook", "interval": 10},
                       {"type": "IterTimerHook"}]
# stock hook type -> the replacement registered by modelscope_plugin.training
HOOK_REPLACEMENTS = {"DDPHook": "SegmentationDDPHook", "CheckpointHook": "SegmentationCheckpointHook",
                     "BestCkptSaverHook": "SegmentationBestCheckpointHook",
                     "TorchAMPOptimizerHook": "SegmentationAMPOptimizerHook"}
METRIC_OF_TASK = {"panoptic": PANOPTIC_QUALITY_METRIC, "instance": COCO_INSTANCE_METRIC, "semantic": SEMANTIC_METRIC}
TASK_OF_METRIC = {metric: task for task, metric in METRIC_OF_TASK.items()}
# post-processing parameters of evaluation per task: every instance counts for AP, however low its score
EVALUATION_THRESHOLDS = {"instance": {"score_thr": 0.0}}
DEFAULT_TRAINING_CONFIG = {
    "train": {
        "dataloader": {"batch_size_per_gpu": 2, "workers_per_gpu": 0},
        # detectron2 Mask2Former: AdamW 1e-4, weight decay 0.05, full-model gradient clipping at 0.01
        "optimizer": {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05,
                      "options": {"grad_clip": {"max_norm": 0.01, "norm_type": 2.0}}},
        # poly decay with power 0.9 per iteration (Mask2Former's ADE20K / Cityscapes schedule); total_iters
        # defaults to the run's iterations
        "lr_scheduler": {"type": "PolynomialLR", "power": 0.9, "options": {"by_epoch": False}},
    },
}

# official FastInst (configs/coco/instance-segmentation/Fast-COCO-InstanceSegmentation.yaml): AdamW 1e-4, weight decay
# 0.05, gradient clipping disabled, steps at 327778 and 355092 of 368750 iterations (gamma 0.1)
FASTINST_TRAINING_CONFIG = {
    "train": {
        "dataloader": {"batch_size_per_gpu": 2, "workers_per_gpu": 0},
        "optimizer": {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05},
        "lr_scheduler": {"type": "MultiStepLR", "gamma": 0.1, "options": {"by_epoch": False}},
        # multi-scale short side 416-640 (long side <= 853), half the time after a 384-600 random crop; 864 canvas
        "augmentation": {"kind": "fastinst", "image_size": 864},
    },
}
FASTINST_MILESTONE_FRACTIONS = (327778 / 368750, 355092 / 368750)

# official EoMT (training/eomt.py): AdamW 1e-4, weight decay 0.05, layer-wise lr decay 0.8, no gradient clipping,
# per iteration a linear warm-up of the parts outside the ViT (500 steps), then of the ViT (1000), then poly decay 0.9
EOMT_TRAINING_CONFIG = {
    "train": {
        "dataloader": {"batch_size_per_gpu": 2, "workers_per_gpu": 0},
        "optimizer": {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05, "layer_decay": 0.8},
        # no warmup: the official 500 + 1000 steps, scaled to runs shorter than 15000 (eomt.py default_warmup)
        "lr_scheduler": {"type": EOMT_SCHEDULER_TYPE, "power": 0.9, "options": {"by_epoch": False}},
    },
}
TRAINING_CONFIG_OF_TYPE = {"fastinst": FASTINST_TRAINING_CONFIG, "eomt": EOMT_TRAINING_CONFIG}


def is_archive_dataset(dataset) -> bool:
    """An ``MsDataset`` of a hub dataset shipped as an archive: ``MsDataset.load`` returns one over an
    ``ExternalDataset`` (``config_kwargs['split_config']`` = the extracted folder), which ``to_custom_dataset``
    replaces by the dataset it builds."""
    return isinstance(dataset, MsDataset) and isinstance(dataset.ds_instance, (ExternalDataset, CocoPanopticDetDataset))


def _rows(dataset) -> Any:
    """An indexable of row dicts: an ``MsDataset`` (its Hugging Face dataset) or a list of rows."""
    if isinstance(dataset, MsDataset):
        return dataset.to_hf_dataset() if hasattr(dataset, "to_hf_dataset") else dataset
    return dataset


@TRAINERS.register_module(module_name=TRAINER_NAME, force=True)
class SegmentationTrainer(EpochBasedTrainer):
    """Finetunes a Mask2Former, FastInst, EoMT or OneFormer model directory; see the module docstring for the
    configuration."""

    def __init__(self, model: str, *arguments, categories: Optional[List[Dict[str, Any]]] = None,
                 class_names: Optional[List[str]] = None, thing_ids: Optional[List[int]] = None, **kwargs):
        if not isinstance(model, (str, Path)):
            raise TrainingConfigError("model must be a model directory, a checkpoint file or a supported hub id "
                                      "(a str)")
        self._categories_argument = categories
        self._notes: List[str] = []
        # merged before the configuration is read (rebuild_config), so that they reach every section it reads
        self._cfg_options = kwargs.pop("cfg_options", None) or {}
        self._train_dataset_argument = kwargs.get("train_dataset")
        self.oneformer_tasks = TASKS_OF_ROW_KIND["panoptic"][0]  # narrowed by the training rows (build_model)
        if synthesized_configuration(model) is not None:  # a checkpoint without a configuration.json
            work_dir = Path(kwargs.get("work_dir") or "./work_dir")
            directory = model_directory_for_training(model, work_dir / "input_model", class_names, thing_ids)
            self._notes.append(f"{model}: the checkpoint was written as the model directory {directory} to train "
                               "from")
            model = directory
        elif class_names is not None or thing_ids is not None:
            given = "class_names" if class_names is not None else "thing_ids"
            raise TrainingConfigError(f"{given} is for checkpoints without a configuration.json; a model directory "
                                      "names its classes and things in its configuration")
        super().__init__(str(model), *arguments, **kwargs)
        if isinstance(self.model_config, EomtConfig):
            if self.train_dataset is not None:  # the default placement needs enough iterations: named here
                self.mask_annealing.steps(self.planned_iterations(), self.model_config.num_query_blocks)
                scheduler = self.cfg.safe_get("train.lr_scheduler") or {}
                if scheduler.get("type") == EOMT_SCHEDULER_TYPE:  # an explicit warm-up must fit the run: named here
                    schedule = eomt_schedule_from(scheduler)
                    total_steps = schedule.total_iters or self.planned_iterations()
                    warmup = schedule.warmup_for(total_steps)
                    if schedule.warmup is None and warmup != OFFICIAL_WARMUP:
                        self._notes.append(f"train.lr_scheduler: the official warm-ups {list(OFFICIAL_WARMUP)} are "
                                           f"scaled to {list(warmup)} for the run of {total_steps} iterations (at "
                                           f"most a tenth of it; unscaled from {WARMUP_SCALING_STEPS}; set "
                                           "train.lr_scheduler.warmup to choose)")
            self.register_hook(EomtMaskAnnealingHook(self.mask_annealing))
        if self.eval_dataset is None and any(type(hook).__name__ == "EvaluationHook" for hook in self.hooks):
            raise TrainingConfigError("an EvaluationHook is configured (train.hooks / evaluation.period) but there is "
                                      "no eval_dataset: give one, or remove the hook")
        for note in self._notes:
            self.logger.info(note)
        self.logger.info(f"training {self.task} on {len(self.train_dataset) if self.train_dataset is not None else 0} "
                         f"images, classes: {', '.join(self.model_config.class_names)}")

    # ------------------------------------------------------------------ model directory and configuration
    def get_or_download_model_dir(self, model, model_revision=None, third_party=None):
        if os.path.isdir(model):
            return os.path.abspath(model)
        return hub.resolve_model_dir(model, model_revision)

    def rebuild_config(self, cfg):
        """``cfg_options`` over the configuration, then the defaults wherever a key is missing (a configured
        ``train.lr_scheduler`` is kept whole: none of the default scheduler's keys join it); the optimizer and lr
        scheduler settings are checked here, when the trainer is built."""
        if cfg.safe_get("train.hooks") is DEFAULT_HOOKS_CONFIG["train.hooks"]:
            cfg.train.hooks = deepcopy(STOCK_DEFAULT_HOOKS)  # a copy for this trainer alone
        if self._cfg_options:
            cfg.merge_from_dict(self._cfg_options)
        cfg = self.read_training_sections(cfg)
        defaults = deepcopy(TRAINING_CONFIG_OF_TYPE.get(cfg.safe_get("model.type"), DEFAULT_TRAINING_CONFIG))
        if cfg.safe_get("train.lr_scheduler") is not None:
            defaults["train"].pop("lr_scheduler")
        cfg.merge_from_dict(defaults, force=False)
        optimizer = cfg.safe_get("train.optimizer") or {}
        parameter_rules_from(optimizer.get("paramwise_options", {}))
        scheduler = cfg.safe_get("train.lr_scheduler") or {}
        if "policy" in scheduler:
            lr_policy_from(scheduler)
        elif scheduler.get("type") == EOMT_SCHEDULER_TYPE:
            if cfg.safe_get("model.type") != "eomt":
                raise TrainingConfigError(f"train.lr_scheduler: {EOMT_SCHEDULER_TYPE} schedules an EoMT's parameter "
                                          f"groups; this model is a {cfg.safe_get('model.type')!r}")
            eomt_schedule_from(scheduler)
        return super().rebuild_config(cfg)

    def read_training_sections(self, cfg):
        """The configuration's training sections in this package's form (here: as they are)."""
        return cfg

    def parameter_name(self, name: str) -> str:
        """The name ``paramwise_options`` patterns are matched against (here: the network's own)."""
        return name

    def build_model(self) -> torch.nn.Module:
        train_cfg = self.cfg.safe_get("train", {})
        config, network = load_model_dir(self.model_dir, task=train_cfg.get("task"))
        if isinstance(config, OneFormerConfig) and self._train_dataset_argument is not None:
            config = self.oneformer_task_for_rows(config, train_cfg.get("task"))
        self.task = config.task
        if isinstance(config, EomtConfig):
            self.mask_annealing = settings_from(MaskAnnealing, train_cfg.get("mask_annealing", {}),
                                                "train.mask_annealing").checked(config.num_query_blocks)
            if (train_cfg.get("optimizer") or {}).get("paramwise_options"):
                raise TrainingConfigError("train.optimizer.paramwise_options: an EoMT trains with layer-wise "
                                          "learning-rate decay (train.optimizer.layer_decay) instead")
        if isinstance(config, FastInstConfig) and self.task != "instance":
            raise TrainingConfigError(f"FastInst trains the instance task only (train.task = {self.task!r})")
        categories = self._categories_argument or train_cfg.get("categories") or self.archive_categories()
        if categories:
            training_categories = contiguous_categories(categories)
        else:
            training_categories = [TrainingCategory(category_id, name, index < config.num_things_classes)
                                   for index, (category_id, name)
                                   in enumerate(zip(config.category_ids, config.class_names))]
        # an instance network classifies things only (stuff segments of panoptic rows are not targets); a OneFormer
        # covers every class unless its rows train the instance task alone
        instance_only = (self.oneformer_tasks == ("instance",) if isinstance(config, OneFormerConfig)
                         else self.task == "instance")
        head_categories = [c for c in training_categories if c.isthing] if instance_only else training_categories
        preprocess = train_cfg.get("preprocess")
        if preprocess:  # e.g. the test-time size of a new dataset; saved with the finetuned model
            known = set(PreprocessConfig.__dataclass_fields__)
            if set(preprocess) - known:
                raise TrainingConfigError(f"unknown train.preprocess keys {sorted(set(preprocess) - known)}; "
                                          f"known: {sorted(known)}")
            config = replace(config, preprocess=replace(config.preprocess, **{
                key: tuple(value) if isinstance(value, list) else value for key, value in preprocess.items()}))
        if isinstance(config, EomtConfig):
            sides = {name: getattr(config.preprocess, name) for name in ("long_side_max", "size_divisor")}
            if any(side != config.image_size for side in sides.values()):
                raise TrainingConfigError(f"train.preprocess: an EoMT runs on {config.image_size}x{config.image_size}"
                                          f" inputs (its image_size); long_side_max and size_divisor must be "
                                          f"{config.image_size}, not {sides}")
        config, message = adapt_class_head(config, network, head_categories, self._seed)
        if message:
            self._notes.append(message)
        self.categories = training_categories
        self.model_config = config
        loss = settings_from(LossConfig, train_cfg.get("loss", {}), "train.loss")
        if isinstance(config, OneFormerConfig):
            if config.text_mapper is None:
                self._notes.append(f"{self.model_dir}: no text mapper (an inference checkpoint, is_training false): "
                                   "OneFormer trains without the query-text contrastive term, as transformers does")
            self.criterion = OneFormerCriterion(
                config.num_classes, class_weight=loss.class_weight, mask_weight=loss.mask_weight,
                dice_weight=loss.dice_weight, contrastive_weight=loss.contrastive_weight,
                no_object_weight=loss.no_object_weight, contrastive_temperature=loss.contrastive_temperature,
                num_points=loss.num_points, oversample_ratio=loss.oversample_ratio,
                importance_sample_ratio=loss.importance_sample_ratio)
            return network
        if isinstance(config, FastInstConfig):
            self.criterion = FastInstCriterion(
                config.num_classes, class_weight=loss.class_weight, mask_weight=loss.mask_weight,
                dice_weight=loss.dice_weight, location_weight=loss.location_weight,
                proposal_weight=loss.proposal_weight,
                no_object_weight=loss.no_object_weight, num_points=loss.num_points,
                oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio)
            return network
        self.criterion = Mask2FormerCriterion(
            config.num_classes,
            HungarianMatcher(loss.class_weight, loss.mask_weight, loss.dice_weight, loss.num_points),
            class_weight=loss.class_weight, mask_weight=loss.mask_weight, dice_weight=loss.dice_weight,
            no_object_weight=loss.no_object_weight, num_points=loss.num_points,
            oversample_ratio=loss.oversample_ratio, importance_sample_ratio=loss.importance_sample_ratio)
        return network

    def oneformer_task_for_rows(self, config: OneFormerConfig, requested: Optional[str]) -> OneFormerConfig:
        """Reads which tasks the training rows can train (``oneformer_tasks``, logged) and checks the configured
        ``train.task`` against them (``TrainingConfigError`` naming both); without one, a default task the rows
        cannot train becomes the task they can."""
        dataset = self._train_dataset_argument
        if is_archive_dataset(dataset):  # a hub archive is read as COCO panoptic
            kind, tasks, reason = "panoptic", TASKS_OF_ROW_KIND["panoptic"][0], ""
        else:
            kind, tasks, reason = trainable_tasks(_rows(dataset))
        self.oneformer_tasks = tuple(tasks)
        if len(tasks) > 1:
            self._notes.append(f"OneFormer trains on {kind} rows: each image's task is drawn from "
                               f"{' / '.join(tasks)} as the reference draws it")
            return config
        if requested is not None and requested not in tasks:
            raise TrainingConfigError(f"train.task {requested!r}: OneFormer's training rows are {kind} rows "
                                      f"({reason}), which train the {tasks[0]} task only")
        self._notes.append(f"OneFormer trains on {kind} rows ({reason}): every image's task is {tasks[0]}")
        if config.task != tasks[0]:
            self._notes.append(f"the default task becomes {tasks[0]} (was {config.task}): the only task the "
                               "training rows hold")
            config = replace(config, task=tasks[0])
        return config

    def get_metrics(self):
        metrics = self.cfg.safe_get("evaluation.metrics")
        if metrics is None:
            metrics = [METRIC_OF_TASK[self.task]]
        metrics = [metrics] if isinstance(metrics, (str, dict, ConfigDict)) else list(metrics)
        with_categories = []
        category_dicts = [{"id": c.id, "name": c.name, "isthing": c.isthing} for c in self.categories]
        for metric in metrics:
            metric = dict(type=metric) if isinstance(metric, str) else dict(metric)
            if metric["type"] in METRIC_OF_TASK.values():
                things = [c for c in category_dicts if c["isthing"]]
                metric.setdefault("categories",
                                  things if metric["type"] == METRIC_OF_TASK["instance"] else category_dicts)
            if metric["type"] == COCO_INSTANCE_METRIC and not metric.get("annotation_file"):
                metric.update(self._instance_ground_truth())
            with_categories.append(metric)
        return with_categories

    def _instance_ground_truth(self) -> Dict[str, Any]:
        """Box / mask AP ground truth for rows without instance annotations: the val data source's ``ann_file``."""
        instances_file = getattr(self.eval_dataset, "instances_file", None)
        if instances_file:
            return {"annotation_file": instances_file}
        if self.eval_dataset is not None and len(self.eval_dataset) and row_kind(self.eval_dataset[0]) != "instance":
            raise TrainingConfigError("box / mask AP needs COCO instance annotations: the evaluation rows are "
                                      f"{row_kind(self.eval_dataset[0])} rows; give the val data source an ann_file "
                                      "or the metric an annotation_file")
        return {}

    def register_hook_from_cfg(self, hook_cfg: List) -> List:
        replaced = []
        for hook in hook_cfg:
            hook = dict(hook)
            hook["type"] = HOOK_REPLACEMENTS.get(hook["type"], hook["type"])
            replaced.append(hook)
        return super().register_hook_from_cfg(replaced)

    # ------------------------------------------------------------------ data
    def build_dataset(self, datasets, model_cfg, mode, preprocessor=None, **kwargs):
        """Rows (or an ``MsDataset`` of them), or an ``MsDataset`` of an extracted hub archive, read through the
        ``dataset.{train,val}`` section by ModelScope's ``to_custom_dataset`` as the stock ``build_dataset`` does,
        except that an error reading it surfaces here (the stock method prints it and goes on with the raw
        dataset)."""
        if datasets is None:
            return None
        rows = self.archive_rows(datasets, model_cfg, mode) if is_archive_dataset(datasets) else _rows(datasets)
        if mode != ModeKeys.TRAIN:
            return rows
        augmentation_values = dict(model_cfg.safe_get("train.augmentation", {}))
        if isinstance(self.model_config, EomtConfig):  # the network takes its own square input size only
            augmentation_values.setdefault("image_size", self.model_config.image_size)
            canvas = augmentation_values.get("crop_size") or augmentation_values["image_size"]
            if canvas != self.model_config.image_size:
                raise TrainingConfigError(f"train.augmentation: the training crop is {canvas}x{canvas}, but an EoMT "
                                          f"trains on its image_size {self.model_config.image_size}")
        augmentation = settings_from(AugmentationConfig, augmentation_values, "train.augmentation")
        if isinstance(self.model_config, OneFormerConfig):  # per-image tasks, targets and text lists
            return OneFormerTrainingDataset(rows, self.categories, self.model_config, augmentation, seed=self._seed)
        return SegmentationTrainingDataset(rows, self.categories, self.task, self.model_config.preprocess,
                                           augmentation, seed=self._seed)

    def archive_rows(self, dataset: MsDataset, model_cfg, mode) -> CocoPanopticDetDataset:
        """The ``CocoPanopticDetDataset`` ModelScope's ``to_custom_dataset`` builds for an archive ``MsDataset``."""
        section_name = f"dataset.{'train' if mode == ModeKeys.TRAIN else 'val'}"
        section = model_cfg.safe_get(section_name)
        if not dataset.is_custom:
            if section is None or section.get("type") != DATASET_TYPE:
                raise TrainingConfigError(
                    f"the {mode} dataset is an MsDataset of a hub archive ({dataset.config_kwargs.get('split_config')}"
                    f"); reading it needs a {section_name} section of type {DATASET_TYPE} (an EasyCV DetDataset / "
                    f"DetSourceCocoPanoptic section reads through build_trainer('easycv', ...)), found "
                    f"{None if section is None else section.get('type')!r}")
            dataset.to_custom_dataset(custom_cfg=model_cfg, preprocessor=None, mode=mode)
        built = dataset.ds_instance
        if not isinstance(built, CocoPanopticDetDataset):
            raise TrainingConfigError(f"{section_name} built a {type(built).__name__}, not a {DATASET_TYPE}")
        self._notes.extend(built.notes)
        if mode == ModeKeys.TRAIN:
            known = {category.id for category in self.categories}
            unknown = sorted({c["id"] for c in built.categories} - known)
            if unknown:
                raise TrainingDataError(f"{section_name}: category ids {unknown} of {built.source.pan_ann_file} are "
                                        f"not in the training class set {sorted(known)}")
        return built

    def archive_categories(self) -> Optional[List[Dict[str, Any]]]:
        """The categories of the train data source's panoptic annotation file when the training set is an archive
        ``MsDataset`` (read here, before the network is built, since they size its class head); else None."""
        dataset = self._train_dataset_argument
        if not is_archive_dataset(dataset):
            return None
        if isinstance(dataset.ds_instance, CocoPanopticDetDataset):  # read already
            return dataset.ds_instance.categories
        section = self.cfg.safe_get("dataset.train")
        if section is None or not section.get("data_source"):
            return None  # archive_rows names the missing section
        data_root = data_root_of(dataset.config_kwargs.get("split_config"))
        source = panoptic_data_source(section["data_source"], data_root, "dataset.train.data_source")
        if not os.path.isfile(source.pan_ann_file):
            raise TrainingDataError(f"dataset.train.data_source.pan_ann_file: file {source.pan_ann_file} does not "
                                    f"exist (data root {data_root})")
        return annotation_categories(source.pan_ann_file)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise TrainingConfigError("train_dataset is needed to train")
        rank, world_size = rank_and_world_size()
        loader_cfg = self.cfg.train.get("dataloader", {})
        self.train_sampler = GlobalBatchSampler(len(self.train_dataset), self.global_batch_size(), self._seed, rank,
                                                world_size, shuffle=bool(loader_cfg.get("shuffle", True)))
        # the loader's own generator: each epoch's iterator draws its workers' base seed from it, not from the global
        # RNG that dropout (OneFormer's query transformer) reads, so a resumed run draws what an uninterrupted one does
        return DataLoader(PositionedDataset(self.train_dataset), batch_sampler=self.train_sampler, collate_fn=collate,
                          num_workers=int(loader_cfg.get("workers_per_gpu", 0)),
                          generator=torch.Generator().manual_seed(self._seed))

    def global_batch_size(self) -> int:
        """Images per training iteration over all ranks (``train.dataloader.batch_size_per_gpu`` x world size)."""
        _, world_size = rank_and_world_size()
        return int(self.cfg.train.get("dataloader", {}).get("batch_size_per_gpu", 2)) * world_size

    def planned_iterations(self) -> int:
        """The run's training iterations, known before its data loader is built (``max_iters`` once training)."""
        if self._train_iters_per_epoch is not None:
            return self._max_epochs * int(self._train_iters_per_epoch)
        return self._max_epochs * (len(self.train_dataset) // self.global_batch_size())

    # ------------------------------------------------------------------ optimisation
    def create_optimizer_and_scheduler(self):
        optimizer_cfg = dict(deepcopy(self.cfg.train.optimizer))
        optimizer_options = optimizer_cfg.pop("options", {}) or {}
        rules = parameter_rules_from(optimizer_cfg.pop("paramwise_options", {}))
        if isinstance(self.model_config, EomtConfig):  # layer-wise lr decay groups (training/eomt.py)
            self.optimizer = build_layer_decay_optimizer(self.unwrap_module(self.model), optimizer_cfg)
        else:
            self.optimizer = build_optimizer(self.unwrap_module(self.model), optimizer_cfg, rules, self.parameter_name)
        if isinstance(self.criterion, OneFormerCriterion) and self.model_config.text_mapper is not None:
            # the contrastive loss's learned logit scale (a parameter of transformers' model, through its loss),
            # at the base rate without weight decay
            self.optimizer.add_param_group({"params": [self.criterion.logit_scale], "weight_decay": 0.0})
        lr_options: Dict[str, Any] = {}
        self.lr_scheduler = None
        scheduler_cfg = self.cfg.train.get("lr_scheduler")
        if scheduler_cfg and "policy" in scheduler_cfg:  # EasyCV / mmcv form: set per iteration
            self.lr_scheduler = PolicyLR(self.optimizer, lr_policy_from(scheduler_cfg), self.iters_per_epoch,
                                         self.max_epochs)
            return self.optimizer, self.lr_scheduler, optimizer_options, {"by_epoch": False}
        if scheduler_cfg and scheduler_cfg.get("type") == EOMT_SCHEDULER_TYPE:  # groups flagged "vit" (eomt.py)
            schedule = eomt_schedule_from(scheduler_cfg)
            total_steps = schedule.total_iters or self.max_iters
            self.lr_scheduler = build_eomt_scheduler(self.optimizer, total_steps, schedule.warmup_for(total_steps),
                                                     schedule.power)
            return self.optimizer, self.lr_scheduler, optimizer_options, {"by_epoch": False}
        if scheduler_cfg:
            scheduler_cfg = dict(deepcopy(scheduler_cfg))
            lr_options = scheduler_cfg.pop("options", {}) or {}
            by_epoch = lr_options.get("by_epoch", True)
            if scheduler_cfg["type"] == "PolynomialLR" and "total_iters" not in scheduler_cfg:
                scheduler_cfg["total_iters"] = self.max_epochs if by_epoch else self.max_iters
            if scheduler_cfg["type"] == "MultiStepLR" and "milestones" not in scheduler_cfg:
                total = self.max_epochs if by_epoch else self.max_iters
                scheduler_cfg["milestones"] = [int(fraction * total) for fraction in FASTINST_MILESTONE_FRACTIONS]
            self.lr_scheduler = self.build_lr_scheduler(cfg=ConfigDict(scheduler_cfg),
                                                        default_args={"optimizer": self.optimizer})
        return self.optimizer, self.lr_scheduler, optimizer_options, lr_options

    def set_checkpoint_file_to_hook(self, checkpoint_path, load_all_state, strict):
        if checkpoint_path is not None:
            self.register_hook(SegmentationLoadCheckpointHook(checkpoint_path, load_all_state, True))

    def to_parallel(self, model):
        return distributed.wrap_data_parallel(model, self.device)

    # ------------------------------------------------------------------ loop
    def train_step(self, model, inputs: TrainingBatch):
        model.train()
        self._mode = ModeKeys.TRAIN
        if isinstance(self.model_config, OneFormerConfig):
            if inputs.text_tokens is not None:
                output = model(inputs.images, inputs.tasks, True, inputs.text_tokens)
            else:  # no text mapper: no contrastive term
                output = OneFormerTrainingOutput(model(inputs.images, inputs.tasks, True), None, None)
        elif isinstance(self.model_config, EomtConfig):  # masked-attention draws seeded per image (eomt.py)
            seeds = [mask_draw_seed(self._seed, self.iter, position) for position in inputs.positions]
            draws = seeded_mask_draws(seeds, self.model_config.num_query_blocks, self.model_config.num_queries)
            output = model(inputs.images, mask_draws=draws.to(inputs.images.device))
        else:
            output = model(inputs.images)
        self.criterion.to(inputs.images.device)  # its class-weight buffer follows the network
        sampler = PointSampler.from_seeds([point_seed(self._seed, self.iter, position)
                                           for position in inputs.positions])
        if isinstance(self.criterion, FastInstCriterion):  # its guided passes re-run the network's decoder layers
            losses = self.criterion(output, inputs.targets, sampler, self.unwrap_module(model).transformer_decoder)
        else:
            losses = self.criterion(output, inputs.targets, sampler)
        total = self.criterion.total(losses)
        if not torch.isfinite(total):
            raise FloatingPointError(f"iteration {self.iter}: the loss is {total.item()} (images "
                                     f"{inputs.indices}); lower train.optimizer.lr or check the targets")
        names = [name for name in ("loss_ce", "loss_mask", "loss_dice", "loss_proposal", "loss_contrastive")
                 if name in losses]
        logged = torch.stack([total.detach()] + [losses[name].detach() for name in names])
        _, world_size = rank_and_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(logged)
            logged /= world_size
        self.log_buffer.update(dict(zip(["loss"] + names, logged.tolist())))
        self.train_outputs = {"loss": total}

    def train_loop(self, data_loader):
        """The stock loop, except that each rank's global RNGs are seeded apart first (``seed_rank_rng``), a
        resumed epoch starts at its next batch without loading the earlier ones, and an epoch whose batches were all
        done before the resume only runs its end-of-epoch hooks."""
        rank, _ = rank_and_world_size()
        seed_rank_rng(self._seed, rank)
        self.invoke_hook(TrainerStages.before_run)
        self.model.train()
        for _ in range(self._epoch, self._max_epochs):
            start = self._inner_iter
            self.train_sampler.set_epoch(self._epoch, start)
            self.train_dataset.set_epoch(self._epoch)
            self.invoke_hook(TrainerStages.before_train_epoch)
            if start < self.iters_per_epoch:
                for index, batch in enumerate(data_loader, start=start):
                    self.data_batch = batch.to(self.device)
                    self._inner_iter = index
                    self.invoke_hook(TrainerStages.before_train_iter)
                    self.train_step(self.model, self.data_batch)
                    self.invoke_hook(TrainerStages.after_train_iter)
                    del self.data_batch
                    self._iter += 1
                    self._mode = ModeKeys.TRAIN
                    if index + 1 >= self.iters_per_epoch:
                        break
            self.invoke_hook(TrainerStages.after_train_epoch)
            self._inner_iter = 0
            self._epoch += 1
            if self._stop_training:
                break
        self.invoke_hook(TrainerStages.after_run)

    # ------------------------------------------------------------------ evaluation
    @property
    def iters_per_epoch(self):
        if self.mode == ModeKeys.EVAL:  # the loggers report an evaluation as one pass over the images
            return len(self.eval_dataset) if self.eval_dataset is not None else 0
        return super().iters_per_epoch

    def evaluate(self, checkpoint_path=None, saving_fn=None, **kwargs):
        if checkpoint_path is not None:
            SegmentationLoadCheckpointHook.load_checkpoint(checkpoint_path, self, load_all_state=False)
        if self.eval_dataset is None:
            raise TrainingConfigError("eval_dataset is needed to evaluate")
        self._mode = ModeKeys.EVAL  # as the stock evaluate: the loggers report the values as a val epoch
        self.invoke_hook(TrainerStages.before_val)
        metrics = [build_metric(metric) for metric in self.metrics]
        tasks = [TASK_OF_METRIC.get(metric["type"], self.task) for metric in self.metrics]
        results = evaluate_network(self.unwrap_module(self.model), self.model_config, self.eval_dataset, metrics,
                                   tasks, self.device, EVALUATION_THRESHOLDS)
        self.invoke_hook(TrainerStages.after_val)
        self.evaluation_results = results
        self._metric_values = flat_metric_values(results)
        return self._metric_values


def model_directory_for_training(checkpoint, directory: Path, class_names: Optional[List[str]] = None,
                                 thing_ids: Optional[List[int]] = None) -> Path:
    """A checkpoint without a configuration.json (Hugging Face folder, EasyCV export, FastInst release, detectron2
    ``.pkl``) written as the model directory the trainer reads (Mask2Former: the native layout; FastInst: the hub
    layout), replacing an earlier copy there (a resumed run rewrites the same weights); ``class_names`` /
    ``thing_ids`` as ``load_model`` takes them (the thing classes first, their class head rows with them)."""
    config, network = load_model(checkpoint, class_names=class_names, thing_ids=thing_ids)
    return write_output_dir(directory, config, network)


def finetuned_model_dir(work_dir) -> Path:
    """Where the trainer leaves the latest weights as a model directory ``pipeline()`` loads."""
    return Path(work_dir) / "output"

