"""Whole pipeline: this package vs ModelScope's built-in pipeline for the same hub-layout directory.

    .venv-oracle/bin/python benchmarks/builtin_speed.py --model swin-l --runs 3
    .venv-oracle/bin/python benchmarks/builtin_speed.py --model r50 --runs 3

``swin-l``: tests/oracles/mmdet_oracle.py writes the ``damo/cv_swinL_panoptic-segmentation_cocopan`` layout with
shaped random weights and runs ModelScope's built-in mmdet pipeline on the image ``--runs`` times; ``r50``:
tests/oracles/easycv_oracle.py does the same for ``damo/cv_r50_panoptic-segmentation_cocopan`` (EasyCV's
pipeline). Then ``pipeline(Tasks.image_segmentation, model=<the same directory>)`` of this package runs ``--runs``
times in a fresh process. Each side's first call is a warm-up; the median of the others is compared.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO.parent / "shared" / "data" / "coco" / "val2017" / "000000439180.jpg"
ORACLE = {
    "swin-l": (["tests/oracles/mmdet_oracle.py", "--task", "panoptic", "--backbone", "swin-l"],
               re.compile(r"^\[oracle\] .*?, ([0-9.]+)s, masks")),
    "r50": (["tests/oracles/easycv_oracle.py", "--backbone", "r50"], re.compile(r"void [0-9.]+%; ([0-9.]+) s$")),
}


def time_ours(model_dir: str, runs: int) -> None:
    import torch
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    import modelscope_plugin  # noqa: F401

    torch.set_num_threads(2)
    segmenter = pipeline(Tasks.image_segmentation, model=model_dir, device="cpu")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        segmenter(str(IMAGE))
        times.append(time.perf_counter() - start)
    print(json.dumps(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ORACLE), default="r50")
    parser.add_argument("--runs", type=int, default=3, help="calls per side, the first a warm-up")
    parser.add_argument("--model-dir", default=None, help="default /tmp/builtin_speed_<model> (rewritten)")
    parser.add_argument("--ours", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.ours:
        time_ours(arguments.ours, arguments.runs)
        return
    model_dir = Path(arguments.model_dir or f"/tmp/builtin_speed_{arguments.model}")
    if model_dir.exists():
        subprocess.run(["rm", "-rf", str(model_dir)], check=True)
    script, pattern = ORACLE[arguments.model]
    completed = subprocess.run(
        [sys.executable, *script, "--seed", "0", "--model-dir", str(model_dir), "--images",
         *[str(IMAGE)] * arguments.runs, "--result", str(model_dir) + ".npz"],
        cwd=REPO, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO), PIP_REQUIRE_VIRTUALENV="1"))
    if completed.returncode != 0:
        raise SystemExit(f"oracle failed:\n{completed.stderr[-4000:]}")
    builtin = [float(match.group(1)) for line in completed.stdout.splitlines() if (match := pattern.search(line))]
    if len(builtin) != arguments.runs:
        raise SystemExit(f"could not read {arguments.runs} timings from the oracle output:\n{completed.stdout[-3000:]}")
    completed = subprocess.run([str(REPO / ".venv" / "bin" / "python"), __file__, "--ours", str(model_dir), "--runs",
                                str(arguments.runs)], capture_output=True, text=True, check=True)
    ours = json.loads(completed.stdout.strip().splitlines()[-1])
    builtin_median, ours_median = statistics.median(builtin[1:]), statistics.median(ours[1:])
    print(f"{arguments.model}, image {IMAGE.name}, 2 threads, median of {arguments.runs - 1} warm calls")
    print(f"ModelScope built-in pipeline: {builtin_median:.2f} s  (all calls: {builtin})")
    print(f"modelscope_plugin pipeline:   {ours_median:.2f} s  (all calls: {[round(t, 2) for t in ours]})")
    print(f"ratio ours / built-in: {ours_median / builtin_median:.3f}")


if __name__ == "__main__":
    main()
