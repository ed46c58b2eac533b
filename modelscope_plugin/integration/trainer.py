"""ModelScope trainer for this package's Mask2Former and FastInst: ``build_trainer('mask2former-segmentation',
dict(model=<dir or hub id>, train_dataset=MsDataset, eval_dataset=MsDataset, work_dir=..., cfg_options={...}))``.

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
resume fails on torch >= 2.6       ``SegmentationCheckpointHook``: RNG state in ``weights_only``-loadable types,
                                   counters
(numpy RNG state vs weights_only)  that resume where the run stopped, native model dir in ``{work_dir}/output``
one parameter group                ``train.optimizer.paramwise_options``: backbone lr x 0.1, no weight decay on norms,
                                   embeddings and Swin position tables (detectron2 Mask2Former)
distributed eval pads with         each image scored once, metric objects merged across ranks
duplicate images
``strict=False`` class heads       a different ``train.categories`` re-initialises the class head, logged
================================  ===================================================================================

Configuration (``configuration.json`` of the model dir, then ``cfg_options``; defaults in ``DEFAULT_TRAINING_CONFIG``):
``train.max_epochs``, ``train.train_iters_per_epoch``, ``train.dataloader.{batch_size_per_gpu,workers_per_gpu}``,
``train.optimizer`` (torch.optim name + arguments, ``options.grad_clip``, ``paramwise_options``),
``train.lr_scheduler`` (torch.optim.lr_scheduler name + arguments, ``options.by_epoch``), ``train.hooks`` /
``train.checkpoint.period`` / ``train.logging`` / ``evaluation.period``, ``train.loss`` (``LossConfig``),
``train.augmentation`` (``AugmentationConfig``), ``train.preprocess`` (``PreprocessConfig`` fields: test-time
resize of the finetuned model), ``train.task`` (panoptic / instance / semantic),
``train.categories`` (COCO category dicts; default: the model's classes), ``evaluation.metrics``.
Datasets: rows of ``modelscope_plugin.data.datasets.read_coco_panoptic`` (any task), ``read_coco_instances``
(instance) or ``read_label_folders`` (semantic), or an ``MsDataset`` of them; rows that cannot train ``train.task``
raise ``TrainingDataError`` when the trainer is built.
"""
import os
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from modelscope.metrics import build_metric
from modelscope.msdatasets.ms_dataset import MsDataset
from modelscope.trainers.builder import TRAINERS
from modelscope.trainers.trainer import EpochBasedTrainer
from modelscope.utils.config import ConfigDict
from modelscope.utils.constant import ModeKeys, TrainerStages
from torch.utils.data import DataLoader

from modelscope_plugin.config import EomtConfig, FastInstConfig, PreprocessConfig
from modelscope_plugin.errors import TrainingConfigError
from modelscope_plugin.integration import hub
from modelscope_plugin.model_dirs.load import load_model_dir
from modelscope_plugin.modeling.criterion import Mask2FormerCriterion
from modelscope_plugin.modeling.fastinst.criterion import FastInstCriterion
from modelscope_plugin.modeling.matcher import HungarianMatcher
from modelscope_plugin.modeling.point_sampling import PointSampler
from modelscope_plugin.ranks import rank_and_world_size
from modelscope_plugin.training import amp, distributed  # noqa: F401  (register SegmentationAMPOptimizerHook, SegmentationDDPHook)
from modelscope_plugin.training.checkpoint import SegmentationLoadCheckpointHook
from modelscope_plugin.training.class_head import adapt_class_head
from modelscope_plugin.training.config import AugmentationConfig, LossConfig, ParameterGroupConfig, settings_from
from modelscope_plugin.training.data import (
    GlobalBatchSampler,
    PositionedDataset,
    SegmentationTrainingDataset,
    TrainingBatch,
    TrainingCategory,
    collate,
    contiguous_categories,
    point_seed,
)
from modelscope_plugin.training.evaluation import evaluate_network, flat_metric_values
from modelscope_plugin.training.optimizer import build_optimizer

TRAINER_NAME = "mask2former-segmentation"
# stock hook type -> the replacement registered by modelscope_plugin.training
HOOK_REPLACEMENTS = {"DDPHook": "SegmentationDDPHook", "CheckpointHook": "SegmentationCheckpointHook",
                     "BestCkptSaverHook": "SegmentationBestCheckpointHook",
                     "TorchAMPOptimizerHook": "SegmentationAMPOptimizerHook"}
METRIC_OF_TASK = {"panoptic": "segmentation-panoptic-quality", "instance": "segmentation-coco-instance-ap",
                  "semantic": "segmentation-semantic-miou"}
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


def _rows(dataset) -> Any:
    """An indexable of row dicts: an ``MsDataset`` (its Hugging Face dataset) or a list of rows."""
    if isinstance(dataset, MsDataset):
        return dataset.to_hf_dataset() if hasattr(dataset, "to_hf_dataset") else dataset
    return dataset


@TRAINERS.register_module(module_name=TRAINER_NAME, force=True)
class SegmentationTrainer(EpochBasedTrainer):
    """Finetunes a Mask2Former or FastInst model directory; see the module docstring for the configuration."""

    def __init__(self, model: str, *arguments, categories: Optional[List[Dict[str, Any]]] = None, **kwargs):
        if not isinstance(model, str):
            raise TrainingConfigError("model must be a model directory or a supported hub id (a str)")
        self._categories_argument = categories
        self._notes: List[str] = []
        super().__init__(model, *arguments, **kwargs)
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
        defaults = FASTINST_TRAINING_CONFIG if cfg.safe_get("model.type") == "fastinst" else DEFAULT_TRAINING_CONFIG
        cfg.merge_from_dict(deepcopy(defaults), force=False)
        return super().rebuild_config(cfg)

    def build_model(self) -> torch.nn.Module:
        train_cfg = self.cfg.safe_get("train", {})
        config, network = load_model_dir(self.model_dir, task=train_cfg.get("task"))
        if isinstance(config, EomtConfig):
            raise TrainingConfigError(
                f"{self.model_dir} is an EoMT; this trainer finetunes Mask2Former and FastInst directories. EoMT's "
                "recipe runs step by step through modelscope_plugin.training.eomt.training_step")
        self.task = config.task
        if isinstance(config, FastInstConfig) and self.task != "instance":
            raise TrainingConfigError(f"FastInst trains the instance task only (train.task = {self.task!r})")
        categories = self._categories_argument or train_cfg.get("categories")
        if categories:
            training_categories = contiguous_categories(categories)
        else:
            training_categories = [TrainingCategory(category_id, name, index < config.num_things_classes)
                                   for index, (category_id, name)
                                   in enumerate(zip(config.category_ids, config.class_names))]
        # an instance network classifies things only (stuff segments of panoptic rows are not targets)
        head_categories = ([c for c in training_categories if c.isthing] if self.task == "instance"
                           else training_categories)
        preprocess = train_cfg.get("preprocess")
        if preprocess:  # e.g. the test-time size of a new dataset; saved with the finetuned model
            known = set(PreprocessConfig.__dataclass_fields__)
            if set(preprocess) - known:
                raise TrainingConfigError(f"unknown train.preprocess keys {sorted(set(preprocess) - known)}; "
                                          f"known: {sorted(known)}")
            config = replace(config, preprocess=replace(config.preprocess, **{
                key: tuple(value) if isinstance(value, list) else value for key, value in preprocess.items()}))
        config, message = adapt_class_head(config, network, head_categories, self._seed)
        if message:
            self._notes.append(message)
        self.categories = training_categories
        self.model_config = config
        loss = settings_from(LossConfig, train_cfg.get("loss", {}), "train.loss")
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
            with_categories.append(metric)
        return with_categories

    def register_hook_from_cfg(self, hook_cfg: List) -> List:
        replaced = []
        for hook in hook_cfg:
            hook = dict(hook)
            hook["type"] = HOOK_REPLACEMENTS.get(hook["type"], hook["type"])
            replaced.append(hook)
        return super().register_hook_from_cfg(replaced)

    # ------------------------------------------------------------------ data
    def build_dataset(self, datasets, model_cfg, mode, preprocessor=None, **kwargs):
        if datasets is None:
            return None
        rows = _rows(datasets)
        if mode != ModeKeys.TRAIN:
            return rows
        augmentation = settings_from(AugmentationConfig, model_cfg.safe_get("train.augmentation", {}),
                                     "train.augmentation")
        return SegmentationTrainingDataset(rows, self.categories, self.task, self.model_config.preprocess,
                                           augmentation, seed=self._seed)

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise TrainingConfigError("train_dataset is needed to train")
        rank, world_size = rank_and_world_size()
        loader_cfg = self.cfg.train.get("dataloader", {})
        per_rank = int(loader_cfg.get("batch_size_per_gpu", 2))
        self.train_sampler = GlobalBatchSampler(len(self.train_dataset), per_rank * world_size, self._seed, rank,
                                                world_size, shuffle=bool(loader_cfg.get("shuffle", True)))
        return DataLoader(PositionedDataset(self.train_dataset), batch_sampler=self.train_sampler, collate_fn=collate,
                          num_workers=int(loader_cfg.get("workers_per_gpu", 0)))

    # ------------------------------------------------------------------ optimisation
    def create_optimizer_and_scheduler(self):
        optimizer_cfg = dict(deepcopy(self.cfg.train.optimizer))
        optimizer_options = optimizer_cfg.pop("options", {}) or {}
        rules = settings_from(ParameterGroupConfig, optimizer_cfg.pop("paramwise_options", {}),
                              "train.optimizer.paramwise_options")
        self.optimizer = build_optimizer(self.unwrap_module(self.model), optimizer_cfg, rules)
        lr_options: Dict[str, Any] = {}
        self.lr_scheduler = None
        scheduler_cfg = self.cfg.train.get("lr_scheduler")
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
        output = model(inputs.images)
        self.criterion.to(output.class_logits.device)  # its class-weight buffer follows the network
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
        names = [name for name in ("loss_ce", "loss_mask", "loss_dice", "loss_proposal") if name in losses]
        logged = torch.stack([total.detach()] + [losses[name].detach() for name in names])
        _, world_size = rank_and_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(logged)
            logged /= world_size
        self.log_buffer.update(dict(zip(["loss"] + names, logged.tolist())))
        self.train_outputs = {"loss": total}

    def train_loop(self, data_loader):
        """The stock loop, except that a resumed epoch starts at its next batch without loading the earlier ones,
        and an epoch whose batches were all done before the resume only runs its end-of-epoch hooks."""
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
        thresholds = {"score_thr": 0.0} if self.task == "instance" else {}
        results = evaluate_network(self.unwrap_module(self.model), self.model_config, self.eval_dataset, metrics,
                                self.task, self.device, **thresholds)
        self.invoke_hook(TrainerStages.after_val)
        self.evaluation_results = results
        self._metric_values = flat_metric_values(results)
        return self._metric_values


def finetuned_model_dir(work_dir) -> Path:
    """Where the trainer leaves the latest weights as a model directory ``pipeline()`` loads."""
    return Path(work_dir) / "output"

