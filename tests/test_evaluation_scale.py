"""evaluate() at scale: sharded under torchrun with each image scored once, and flat memory over many images."""
import json
import os
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from modelscope_plugin.data.ground_truth_outputs import panoptic_outputs
from modelscope_plugin.data.synthetic import SYNTHETIC_CATEGORIES, SceneConfig, write_dataset
from modelscope_plugin.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]


class PerturbedGroundTruth:
    """Pipeline stand-in: the row's ground truth with every third segment dropped and the first one relabelled
    (deterministic per image, so any rank gives the same result for an image). Records what it was asked."""

    def __init__(self, rows):
        self.rows = {row["image_path"]: row for row in rows}
        self.seen = []

    def __call__(self, image_path, **unused):
        self.seen.append(image_path)
        outputs = panoptic_outputs(self.rows[image_path], SYNTHETIC_CATEGORIES)
        kept = [info for index, info in enumerate(outputs["segments_info"]) if index % 3 != 2]
        panoptic_seg = np.where(np.isin(outputs["panoptic_seg"], [info["id"] for info in kept]), outputs["panoptic_seg"], 0)
        kept = [dict(info) for info in kept]
        kept[0]["category_id"] = SYNTHETIC_CATEGORIES[(kept[0]["label_id"] + 1) % len(SYNTHETIC_CATEGORIES)].id
        return {"panoptic_seg": panoptic_seg, "segments_info": kept}


@pytest.fixture(scope="module")
def synthetic_split(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"), "val", num_images=7, seed=3, config=SceneConfig(image_size=128))


def test_torchrun_shards_each_image_once_and_equals_one_process(synthetic_split, tmp_path):
    rows = synthetic_split.panoptic_rows()
    single = evaluate(PerturbedGroundTruth(rows), rows, "panoptic", categories=SYNTHETIC_CATEGORIES, progress=False)
    assert 0 < single["PQ"] < 100  # the perturbation makes a difference the ranks must agree on
    output = tmp_path / "distributed.json"
    environment = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    with socket.socket() as probe:  # a free port, not a fixed one another run on this machine may hold
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    str(REPO / "tests" / "distributed_evaluation_worker.py"), str(synthetic_split.root), "val", str(output)],
                   check=True, env=environment, capture_output=True, timeout=600)
    distributed = json.loads(output.read_text())
    seen = [json.loads(Path(f"{output}.rank{rank}").read_text()) for rank in (0, 1)]
    assert sorted(seen[0] + seen[1]) == sorted(row["image_path"] for row in rows)  # each image exactly once
    assert len(seen[0]) == 4 and len(seen[1]) == 3  # no padding duplicates
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "n"):
        assert distributed[key] == pytest.approx(single[key], abs=1e-9), key


def test_memory_stays_flat_as_images_grow(tmp_path):
    split = write_dataset(tmp_path, "many", num_images=200, seed=5, config=SceneConfig(image_size=128))
    rows = split.panoptic_rows()
    peaks = {}
    for count in (20, 200):
        tracemalloc.start()
        results = evaluate(PerturbedGroundTruth(rows[:count]), rows[:count], "panoptic", categories=SYNTHETIC_CATEGORIES,
                           progress=False)
        peaks[count] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert 0 < results["PQ"] < 100
    # ten times the images: the peak is one image's working set either way, not a growing list of results
    assert peaks[200] < 1.25 * peaks[20], peaks
