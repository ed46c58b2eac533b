"""OneFormer's training data for the trainer: per image a task, that task's target and, for a network with a text
mapper, its text list in CLIP token ids (``modeling/oneformer/clip_tokenizer.py``).

The tasks an image can train follow from what its rows annotate (``training.data.TASKS_OF_ROW_KIND``): panoptic rows
(the reference's unified mapper reads COCO-style panoptic annotations) hold every task's segments, so each image's
task is drawn as the reference draws it (``modeling/oneformer/training_targets.py``); instance rows hold thing
objects only and train the instance task, label maps one class per pixel and train the semantic task, on every
image. Each image's target and text list are that task's (``task_target``), built from every segment its rows hold
(panoptic: every non-crowd segment; instance: the non-crowd thing objects; semantic: one mask per class).

The task is drawn from a generator seeded by (seed, epoch, dataset index) alone, like the augmentation, so it does
not depend on the rank, the number of ranks, the data-loader workers or a resume.
"""
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from modelscope_plugin.config import OneFormerConfig
from modelscope_plugin.modeling.oneformer.clip_tokenizer import clip_tokenizer
from modelscope_plugin.modeling.oneformer.training_targets import sample_task, task_target
from modelscope_plugin.training.data import (
    TASKS_OF_ROW_KIND,
    SegmentationTrainingDataset,
    TrainingCategory,
    TrainingSample,
    rows_kind,
)

TASK_STREAM = 1
"""Extra entropy word that separates the task draw's generator from the augmentation's ([seed, epoch, index])."""


def task_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one image's task draw in one epoch."""
    state = np.random.SeedSequence([seed, epoch, index, TASK_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state % (2 ** 63)))


def trainable_tasks(rows) -> Tuple[str, Tuple[str, ...], str]:
    """(the rows' kind, the tasks OneFormer can train on them, why not the others: empty for panoptic rows)."""
    kind = rows_kind(rows)
    tasks, reason = TASKS_OF_ROW_KIND[kind]
    return kind, tuple(tasks), reason


class OneFormerTrainingDataset(SegmentationTrainingDataset):
    """``SegmentationTrainingDataset`` whose samples carry their task (drawn on panoptic rows, the one task instance
    and label rows can train), its target and (with ``text_length``) the tokenised text list of ``num_text``
    entries."""

    def __init__(self, rows, categories: Sequence[TrainingCategory], config: OneFormerConfig, augmentation,
                 seed: int = 0):
        kind, self.tasks, _ = trainable_tasks(rows)
        # the base target holds every segment the rows annotate: the kind's own task (panoptic, instance, semantic)
        super().__init__(rows, categories, kind, config.preprocess, augmentation, seed=seed)
        self.class_names = tuple(category.name for category in categories)
        self.thing_classes = tuple(index for index, category in enumerate(categories) if category.isthing)
        mapper = config.text_mapper
        self.num_text: Optional[int] = None if mapper is None else config.num_queries - mapper.num_context
        self.text_length: Optional[int] = None if mapper is None else mapper.context_length

    def task_of(self, index: int) -> str:
        """Image ``index``'s task in this epoch: drawn when the rows hold every task's segments, else their one."""
        if len(self.tasks) == 1:
            return self.tasks[0]
        return sample_task(task_generator(self.seed, self.epoch, index))

    def __getitem__(self, index: int) -> TrainingSample:
        sample = super().__getitem__(index)  # target: every segment the row annotates
        task = self.task_of(index)
        num_text = self.num_text or 1
        target, texts = task_target(sample.target.labels, sample.target.masks, task, self.class_names,
                                    self.thing_classes, num_text)
        # (num_text, context_length) CLIP ids
        tokens = None if self.num_text is None else clip_tokenizer().tokenize(texts, self.text_length)
        return TrainingSample(sample.image, target, index, task, tokens)
