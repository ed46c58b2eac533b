"""Run by tests/test_evaluation_scale.py under ``torchrun``: evaluate a synthetic split on one rank of a gloo group.

Arguments: dataset root, split, output JSON path. Each rank also writes ``<output>.rank<r>`` listing the images it
scored, so the test can check that every image was evaluated exactly once.
"""
import json
import sys
from pathlib import Path

import torch.distributed as distributed
from test_evaluation_scale import PerturbedGroundTruth

from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SyntheticSplit
from modelscope_plugin.evaluation import evaluate


def main(root: str, split: str, output: str) -> None:
    distributed.init_process_group("gloo")
    rank = distributed.get_rank()
    rows = SyntheticSplit(Path(root), split).panoptic_rows()
    predictor = PerturbedGroundTruth(rows)
    results = evaluate(predictor, rows, "panoptic", categories=SYNTHETIC_CATEGORIES, progress=False)
    with open(f"{output}.rank{rank}", "w") as handle:
        json.dump(predictor.seen, handle)
    if rank == 0:
        with open(output, "w") as handle:
            json.dump(results, handle)
    distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
