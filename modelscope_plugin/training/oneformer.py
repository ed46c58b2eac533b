"""OneFormer's training data for the trainer: per image a task drawn as the reference does
(``modeling/oneformer/training_targets.py``), that task's target and, for a network with a text mapper, its text
list in CLIP token ids (``modeling/oneformer/clip_tokenizer.py``).

The task is drawn from a generator seeded by (seed, epoch, dataset index) alone, like the augmentation, so it does
not depend on the rank, the number of ranks, the data-loader workers or a resume. Targets come from panoptic rows
(the reference's unified mapper reads COCO-style panoptic annotations): the image's non-crowd segments, of which
each task keeps its own (``task_target``).
"""
from typing import Optional, Sequence

import numpy as np
import torch

from modelscope_plugin.config import OneFormerConfig
from modelscope_plugin.errors import TrainingDataError
from modelscope_plugin.modeling.oneformer.clip_tokenizer import clip_tokenizer
from modelscope_plugin.modeling.oneformer.training_targets import sample_task, task_target
from modelscope_plugin.training.data import SegmentationTrainingDataset, TrainingCategory, TrainingSample

TASK_STREAM = 1
"""Extra entropy word that separates the task draw's generator from the augmentation's ([seed, epoch, index])."""


def task_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one image's task draw in one epoch."""
    state = np.random.SeedSequence([seed, epoch, index, TASK_STREAM]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state % (2 ** 63)))


class OneFormerTrainingDataset(SegmentationTrainingDataset):
    """``SegmentationTrainingDataset`` of panoptic rows whose samples carry a drawn task, its target and (with
    ``text_length``) the tokenised text list of ``num_text`` entries."""

    def __init__(self, rows, categories: Sequence[TrainingCategory], config: OneFormerConfig, augmentation,
                 seed: int = 0):
        try:  # rows of every other kind are refused, naming theirs
            super().__init__(rows, categories, "panoptic", config.preprocess, augmentation, seed=seed)
        except TrainingDataError as error:
            raise TrainingDataError(f"OneFormer trains on panoptic rows (each image's task is drawn and its targets "
                                    f"derived from its segments): {error}") from error
        self.class_names = tuple(category.name for category in categories)
        self.thing_classes = tuple(index for index, category in enumerate(categories) if category.isthing)
        mapper = config.text_mapper
        self.num_text: Optional[int] = None if mapper is None else config.num_queries - mapper.num_context
        self.text_length: Optional[int] = None if mapper is None else mapper.context_length

    def __getitem__(self, index: int) -> TrainingSample:
        sample = super().__getitem__(index)  # target: every non-crowd segment (the panoptic task's)
        task = sample_task(task_generator(self.seed, self.epoch, index))
        num_text = self.num_text or 1
        target, texts = task_target(sample.target.labels, sample.target.masks, task, self.class_names,
                                    self.thing_classes, num_text)
        # (num_text, context_length) CLIP ids
        tokens = None if self.num_text is None else clip_tokenizer().tokenize(texts, self.text_length)
        return TrainingSample(sample.image, target, index, task, tokens)
