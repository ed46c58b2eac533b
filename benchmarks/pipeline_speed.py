"""Whole-pipeline time and peak memory: this package vs transformers' Mask2Former, same random weights.

Run with the oracle environment (it sees both packages):
    .venv-oracle/bin/python benchmarks/pipeline_speed.py --backbone swin-l --runs 3
It builds a random-weight ``Mask2FormerForUniversalSegmentation`` (tests/oracles/hf_oracle.py), loads the same
weights into this package, and times, interleaved, on one COCO image:
- transformers: image processor (800/1333) + forward + ``post_process_panoptic_segmentation``;
- this package: load/resize/normalise/pad + forward + panoptic inference at the original size.
Prints the median of each and their ratio; peak RSS is reported per implementation from a child process.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the oracle env sees .venv's packages but not its editable install
IMAGE = REPO.parent / "shared" / "data" / "coco" / "val2017" / "000000439180.jpg"


def time_ours(model_dir: Path, runs: int, threads: int):
    import torch

    from modelscope_plugin.checkpoint_hf import load_hf_model_dir
    from modelscope_plugin.postprocessing import panoptic_inference
    from modelscope_plugin.preprocessing import load_image, prepare_image

    torch.set_num_threads(threads)
    config, network = load_hf_model_dir(model_dir)
    config_preprocess = config.preprocess.__class__(resize_backend="cv2")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with torch.inference_mode():
            image = prepare_image(load_image(str(IMAGE)), config_preprocess)
            output = network(image.tensor[None])
            panoptic_inference(output.class_logits[0], output.mask_logits[0], config.num_things_classes,
                               image.padded_size, image.resized_size, image.original_size)
        times.append(time.perf_counter() - start)
    return times


def time_transformers(model_dir: Path, runs: int, threads: int):
    import torch
    from PIL import Image
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    torch.set_num_threads(threads)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with torch.inference_mode():
            image = Image.open(IMAGE).convert("RGB")
            inputs = processor(images=image, return_tensors="pt")
            outputs = model(**inputs)
            processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="swin-l", choices=["swin-t", "swin-b", "swin-l", "r50"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse an hf_oracle.py folder")
    parser.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        function = time_ours if arguments.child == "ours" else time_transformers
        times = function(arguments.model_dir, arguments.runs, arguments.threads)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(json.dumps({"times": times, "peak_rss_gib": peak_gib}))
        return
    model_dir = arguments.model_dir or Path(f"/tmp/benchmark_hf_{arguments.backbone}")
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "oracles" / "hf_oracle.py"), "make", "--backbone",
                        arguments.backbone, "--seed", "0", "--out-dir", str(model_dir)], check=True)
    results = {"ours": [], "transformers": []}
    peaks = {}
    # interleave: one child per implementation and run, alternating, so load drifts hit both alike
    for _ in range(arguments.runs):
        for name in ("transformers", "ours"):
            completed = subprocess.run([sys.executable, __file__, "--child", name, "--model-dir", str(model_dir),
                                        "--runs", "2", "--threads", str(arguments.threads)],
                                       capture_output=True, text=True, check=True)
            report = json.loads(completed.stdout.strip().splitlines()[-1])
            results[name].append(report["times"][-1])  # second call in the process: warm
            peaks[name] = max(peaks.get(name, 0.0), report["peak_rss_gib"])
    ours, theirs = statistics.median(results["ours"]), statistics.median(results["transformers"])
    print(f"backbone {arguments.backbone}, {arguments.threads} threads, {arguments.runs} runs, image {IMAGE.name}")
    print(f"transformers (processor + forward + post_process_panoptic): median {theirs:.2f} s, peak RSS {peaks['transformers']:.2f} GiB")
    print(f"modelscope_plugin (preprocess + forward + panoptic):        median {ours:.2f} s, peak RSS {peaks['ours']:.2f} GiB")
    print(f"ratio ours / transformers: {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
