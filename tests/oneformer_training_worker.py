"""Run by tests/test_oneformer_trainer.py under ``torchrun``: finetunes a OneFormer folder on synthetic panoptic rows
on one rank of a gloo group, dropout and stochastic depth off (``NoDropout``), without oneDNN's batch-size-dependent
convolutions.

Arguments: model dir, data root, work dir, options JSON. Each rank writes ``rank_<r>.json`` in the work dir: the world
size, a checksum per weight tensor and the logit scale after training, and per iteration the dataset indices and tasks
of the images it trained on.
"""
import json
import os
import sys
from pathlib import Path

import torch
from modelscope.trainers import build_trainer
from modelscope.trainers.hooks.hook import Hook
from torchvision.ops import StochasticDepth

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_oneformer_trainer import CATEGORIES  # noqa: E402

from modelscope_plugin.data.datasets import as_ms_dataset  # noqa: E402
from modelscope_plugin.data.synthetic import SyntheticSplit  # noqa: E402


class NoDropout(Hook):
    """Dropout and stochastic depth off before training: their masks depend on how the global batch is split between
    ranks (each rank draws its images' masks from its own stream, seeded apart by rank)."""

    def before_run(self, trainer):
        for module in trainer.unwrap_module(trainer.model).modules():
            if isinstance(module, (torch.nn.Dropout, StochasticDepth)):
                module.p = 0.0
            if isinstance(module, torch.nn.MultiheadAttention):
                module.dropout = 0.0


class TaskRecorder(Hook):
    """Per iteration: (epoch, dataset indices, tasks) of this rank's images."""

    def __init__(self):
        self.iterations = []

    def before_train_iter(self, trainer):
        self.iterations.append({"epoch": trainer.epoch, "indices": list(trainer.data_batch.indices),
                                "tasks": list(trainer.data_batch.tasks)})


def make_trainer(model_dir, data_root, work_dir, options, callbacks=(), **kwargs):
    rows = SyntheticSplit(Path(data_root), "train").panoptic_rows()
    return build_trainer("mask2former-segmentation", dict(
        model=str(model_dir), train_dataset=as_ms_dataset(rows), work_dir=str(work_dir), categories=CATEGORIES,
        cfg_options=dict(options), callbacks=[NoDropout(), *callbacks], seed=7, **kwargs))


def main(model_dir: str, data_root: str, work_dir: str, options: str) -> None:
    torch.backends.mkldnn.enabled = False
    recorder = TaskRecorder()
    trainer = make_trainer(model_dir, data_root, work_dir, json.loads(options), [recorder], launcher="pytorch")
    trainer.train()
    network = trainer.unwrap_module(trainer.model)
    checksums = {key: float(value.double().sum()) for key, value in network.state_dict().items()}
    report = {"world_size": torch.distributed.get_world_size(), "checksums": checksums,
              "logit_scale": float(trainer.criterion.logit_scale.detach()), "iterations": recorder.iterations}
    (Path(work_dir) / f"rank_{os.environ['RANK']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
