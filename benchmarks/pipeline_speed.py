"""Whole-pipeline time and peak memory: this package vs transformers' Mask2Former, same random weights.

Run with the oracle environment (it sees both packages):
    .venv-oracle/bin/python benchmarks/pipeline_speed.py --backbone swin-l --runs 3
It builds a random-weight ``Mask2FormerForUniversalSegmentation`` (tests/oracles/hf_oracle.py), loads the same
weights into this package, and times, interleaved (one child process per implementation and run, so that load
drifts hit all alike and peak RSS is per implementation), on one COCO image:
- transformers: image processor (800/1333) + forward + ``post_process_panoptic_segmentation``;
- this package, fp32 and bf16 autocast: load/resize/normalise/pad + forward + panoptic inference at the original
  size, each phase timed.
Each child runs the pipeline twice and reports the second (warm) run. Prints medians and the issue's ratios.
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
IMPLEMENTATIONS = ("transformers", "ours", "ours-bf16")


def time_ours(model_dir: Path, runs: int, precision: str):
    import torch

    from modelscope_plugin.inference.postprocess import panoptic_inference
    from modelscope_plugin.inference.precision import inference_context
    from modelscope_plugin.inference.preprocess import load_image, prepare_image
    from modelscope_plugin.model_dirs.hf import load_hf_model_dir

    config, network = load_hf_model_dir(model_dir)
    config_preprocess = config.preprocess.__class__(resize_backend="cv2")
    phases = []
    for _ in range(runs):
        start = time.perf_counter()
        image = prepare_image(load_image(str(IMAGE)), config_preprocess)
        preprocessed = time.perf_counter()
        with inference_context(torch.device("cpu"), precision):
            output = network(image.tensor[None])
        forwarded = time.perf_counter()
        with torch.inference_mode():
            panoptic_inference(output.class_logits[0].float(), output.mask_logits[0].float(), config.num_things_classes,
                               image.padded_size, image.resized_size, image.original_size,
                               object_mask_threshold=0.8, overlap_threshold=0.8, filter_low_score=True)
        finished = time.perf_counter()
        phases.append({"total": finished - start, "preprocess": preprocessed - start,
                       "forward": forwarded - preprocessed, "postprocess": finished - forwarded,
                       "input": list(image.tensor.shape[-2:])})
    return phases


def time_transformers(model_dir: Path, runs: int):
    import torch
    from PIL import Image
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32)
    phases = []
    for _ in range(runs):
        start = time.perf_counter()
        with torch.inference_mode():
            image = Image.open(IMAGE).convert("RGB")
            inputs = processor(images=image, return_tensors="pt")
            preprocessed = time.perf_counter()
            outputs = model(**inputs)
            forwarded = time.perf_counter()
            processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])
        finished = time.perf_counter()
        phases.append({"total": finished - start, "preprocess": preprocessed - start,
                       "forward": forwarded - preprocessed, "postprocess": finished - forwarded,
                       "input": list(inputs["pixel_values"].shape[-2:])})
    return phases


def run_child(name: str, model_dir: Path, threads: int) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--child", name, "--model-dir", str(model_dir),
                                "--threads", str(threads)], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{name} child failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="swin-l", choices=["swin-t", "swin-b", "swin-l", "r50"])
    parser.add_argument("--runs", type=int, default=3, help="child processes per implementation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse an hf_oracle.py folder")
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="time bf16 autocast too (auto: only where the CPU has native bf16 matrix units)")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        import torch

        torch.set_num_threads(arguments.threads)
        if arguments.child == "transformers":
            phases = time_transformers(arguments.model_dir, runs=2)
        else:
            phases = time_ours(arguments.model_dir, runs=2,
                               precision="bf16" if arguments.child == "ours-bf16" else "fp32")
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(json.dumps({"phases": phases[-1], "peak_rss_gib": peak_gib}))
        return
    model_dir = arguments.model_dir or Path(f"/tmp/benchmark_hf_{arguments.backbone}")
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "oracles" / "hf_oracle.py"), "make", "--backbone",
                        arguments.backbone, "--seed", "0", "--out-dir", str(model_dir)], check=True)
    import torch

    from modelscope_plugin.inference.precision import cpu_has_native_bf16

    implementations = list(IMPLEMENTATIONS)
    if arguments.bf16 == "no" or (arguments.bf16 == "auto" and not cpu_has_native_bf16()):
        implementations.remove("ours-bf16")
        print(f"bf16 not timed: {'--bf16 no' if arguments.bf16 == 'no' else 'this CPU has no native bf16 matrix units'}"
              f" (torch CPU capability: {torch.backends.cpu.get_cpu_capability()})")
    reports = {name: [] for name in implementations}
    for run in range(arguments.runs):
        for name in implementations:
            reports[name].append(run_child(name, model_dir, arguments.threads))
            phases = reports[name][-1]["phases"]
            print(f"run {run} {name:12s} total {phases['total']:6.2f} s (forward {phases['forward']:6.2f} s, "
                  f"post {phases['postprocess']:5.2f} s), input {phases['input']}", flush=True)

    def median(name: str, phase: str) -> float:
        return statistics.median(report["phases"][phase] for report in reports[name])

    def peak(name: str) -> float:
        return max(report["peak_rss_gib"] for report in reports[name])

    theirs, ours = median("transformers", "total"), median("ours", "total")
    print(f"\nbackbone {arguments.backbone}, {arguments.threads} threads, {arguments.runs} runs, image {IMAGE.name}, "
          f"medians of warm runs")
    for name, label in (("transformers", "transformers fp32 (processor + forward + post_process_panoptic)"),
                        ("ours", "modelscope_plugin fp32 (preprocess + forward + panoptic)"),
                        ("ours-bf16", "modelscope_plugin bf16 autocast")):
        if name not in reports:
            continue
        print(f"{label:64s} {median(name, 'total'):6.2f} s  forward {median(name, 'forward'):6.2f} s  "
              f"post {median(name, 'postprocess'):5.2f} s  peak RSS {peak(name):.2f} GiB")
    print(f"ratio fp32 ours / transformers:            {ours / theirs:.3f}")
    if "ours-bf16" in reports:
        print(f"ratio bf16 ours / transformers fp32:       {median('ours-bf16', 'total') / theirs:.3f}")
    print(f"post-processing / forward (ours fp32):     {median('ours', 'postprocess') / median('ours', 'forward'):.3f}")
    print(f"peak RSS ours / transformers:              {peak('ours') / peak('transformers'):.3f}")


if __name__ == "__main__":
    main()
