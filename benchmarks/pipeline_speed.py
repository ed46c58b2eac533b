"""Whole-pipeline time, peak memory and bf16 agreement: this package vs transformers' Mask2Former, same random weights.

Run with the oracle environment (it sees both packages):
    .venv-oracle/bin/python benchmarks/pipeline_speed.py --backbone swin-l --runs 3
It builds a random-weight ``Mask2FormerForUniversalSegmentation`` (tests/oracles/hf_oracle.py), loads the same
weights into this package, and times, interleaved (one child process per implementation and run, so that load
drifts hit all alike and peak RSS is per implementation), on one COCO image:
- transformers, fp32 and under bf16 autocast: image processor (800/1333) + forward +
  ``post_process_panoptic_segmentation``;
- this package, fp32 and ``precision="bf16"``: ``Predictor`` (decode, resize, normalise, pad + forward + panoptic
  inference at the original size and the outputs), each phase timed.
Each child runs the pipeline twice and reports the second (warm) run, and saves its map of panoptic classes; the
bf16 rows are compared with their implementation's fp32 map (fraction of pixels with the same class, or none in
both). Prints medians, the issue's ratios and the agreements. bf16 is timed only where the CPU has native bf16
(``--bf16 yes`` forces it).
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
IMPLEMENTATIONS = ("transformers", "transformers-bf16", "ours", "ours-bf16")
BF16_REFERENCES = {"ours-bf16": "ours", "transformers-bf16": "transformers"}  # bf16 row -> its fp32 row


def time_ours(model_dir: Path, runs: int, precision: str):
    """Phases of ``runs`` calls of this package's ``Predictor`` (cv2 resize, as mmdet) and the last call's map of
    panoptic classes (H, W) (-1: no segment)."""
    import dataclasses

    import numpy as np

    from modelscope_plugin.inference.predictor import Predictor
    from modelscope_plugin.model_dirs.hf import load_hf_model_dir

    config, network = load_hf_model_dir(model_dir)
    config = dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, resize_backend="cv2"))
    predictor = Predictor(network, config, precision=precision)
    parameters = predictor.parameters(task="panoptic")
    phases = []
    for _ in range(runs):
        start = time.perf_counter()
        image = predictor.prepare(str(IMAGE), parameters.task)
        preprocessed = time.perf_counter()
        output = predictor.run(image.network_input(), parameters.task)
        forwarded = time.perf_counter()
        result = predictor.postprocess(image, output.class_logits[0], output.mask_logits[0], parameters)
        finished = time.perf_counter()
        phases.append({"total": finished - start, "preprocess": preprocessed - start,
                       "forward": forwarded - preprocessed, "postprocess": finished - forwarded,
                       "input": list(image.network_input().shape[-2:])})
    classes = np.full(result["panoptic_seg"].shape, -1, dtype=np.int64)
    for segment in result["segments_info"]:
        classes[result["panoptic_seg"] == segment["id"]] = segment["label_id"]
    return phases, classes


def time_transformers(model_dir: Path, runs: int, precision: str):
    """As ``time_ours`` for transformers' processor, model (under bf16 autocast for "bf16") and post-processing."""
    import contextlib

    import numpy as np
    import torch
    from PIL import Image
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    model = Mask2FormerForUniversalSegmentation.from_pretrained(model_dir).eval()
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())
    phases = []
    for _ in range(runs):
        start = time.perf_counter()
        with torch.inference_mode():
            image = Image.open(IMAGE).convert("RGB")
            inputs = processor(images=image, return_tensors="pt")
            preprocessed = time.perf_counter()
            with autocast:
                outputs = model(**inputs)
            forwarded = time.perf_counter()
            outputs.class_queries_logits = outputs.class_queries_logits.float()
            outputs.masks_queries_logits = outputs.masks_queries_logits.float()
            result = processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        finished = time.perf_counter()
        phases.append({"total": finished - start, "preprocess": preprocessed - start,
                       "forward": forwarded - preprocessed, "postprocess": finished - forwarded,
                       "input": list(inputs["pixel_values"].shape[-2:])})
    segmentation = result["segmentation"].numpy()
    classes = np.full(segmentation.shape, -1, dtype=np.int64)
    for segment in result["segments_info"]:
        classes[segmentation == segment["id"]] = segment["label_id"]
    return phases, classes


def run_child(name: str, model_dir: Path, threads: int, classes_path: Path) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--child", name, "--model-dir", str(model_dir),
                                "--threads", str(threads), "--classes-out", str(classes_path)],
                               capture_output=True, text=True)
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
    parser.add_argument("--classes-out", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        import torch

        torch.set_num_threads(arguments.threads)
        import numpy as np

        precision = "bf16" if arguments.child.endswith("-bf16") else "fp32"
        timer = time_transformers if arguments.child.startswith("transformers") else time_ours
        phases, classes = timer(arguments.model_dir, runs=2, precision=precision)
        np.save(arguments.classes_out, classes)
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(json.dumps({"phases": phases[-1], "peak_rss_gib": peak_gib}))
        return
    model_dir = arguments.model_dir or Path(f"/tmp/benchmark_hf_{arguments.backbone}")
    if not (model_dir / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "oracles" / "hf_oracle.py"), "make", "--backbone",
                        arguments.backbone, "--seed", "0", "--out-dir", str(model_dir)], check=True)
    import tempfile

    import numpy as np
    import torch

    from modelscope_plugin.inference.precision import cpu_has_native_bf16

    implementations = list(IMPLEMENTATIONS)
    if arguments.bf16 == "no" or (arguments.bf16 == "auto" and not cpu_has_native_bf16()):
        implementations = [name for name in implementations if name not in BF16_REFERENCES]
        print(f"bf16 not timed: {'--bf16 no' if arguments.bf16 == 'no' else 'this CPU has no native bf16 matrix units'}"
              f" (torch CPU capability: {torch.backends.cpu.get_cpu_capability()})")
    reports = {name: [] for name in implementations}
    classes_folder = Path(tempfile.mkdtemp(prefix="pipeline_speed_"))
    agreements = {name: [] for name in BF16_REFERENCES if name in implementations}
    for run in range(arguments.runs):
        for name in implementations:
            reports[name].append(run_child(name, model_dir, arguments.threads, classes_folder / f"{name}.npy"))
            phases = reports[name][-1]["phases"]
            print(f"run {run} {name:12s} total {phases['total']:6.2f} s (forward {phases['forward']:6.2f} s, "
                  f"post {phases['postprocess']:5.2f} s), input {phases['input']}", flush=True)
        for name, reference in BF16_REFERENCES.items():
            if name in agreements:
                agreements[name].append(float(np.mean(np.load(classes_folder / f"{name}.npy")
                                                      == np.load(classes_folder / f"{reference}.npy"))))

    def median(name: str, phase: str) -> float:
        return statistics.median(report["phases"][phase] for report in reports[name])

    def peak(name: str) -> float:
        return max(report["peak_rss_gib"] for report in reports[name])

    theirs, ours = median("transformers", "total"), median("ours", "total")
    print(f"\nbackbone {arguments.backbone}, {arguments.threads} threads, {arguments.runs} runs, image {IMAGE.name}, "
          f"medians of warm runs")
    for name, label in (("transformers", "transformers fp32 (processor + forward + post_process_panoptic)"),
                        ("transformers-bf16", "transformers bf16 autocast"),
                        ("ours", "modelscope_plugin fp32 (preprocess + forward + panoptic)"),
                        ("ours-bf16", "modelscope_plugin precision='bf16'")):
        if name not in reports:
            continue
        print(f"{label:64s} {median(name, 'total'):6.2f} s  forward {median(name, 'forward'):6.2f} s  "
              f"post {median(name, 'postprocess'):5.2f} s  peak RSS {peak(name):.2f} GiB")
    print(f"ratio fp32 ours / transformers:            {ours / theirs:.3f}")
    if "ours-bf16" in reports:
        print(f"ratio bf16 ours / transformers fp32:       {median('ours-bf16', 'total') / theirs:.3f}")
        print(f"ratio bf16 ours / transformers bf16:       "
              f"{median('ours-bf16', 'total') / median('transformers-bf16', 'total'):.3f}")
        print(f"ratio bf16 ours / ours fp32:               {median('ours-bf16', 'total') / ours:.3f}")
    for name, values in agreements.items():
        print(f"pixels with the fp32 class, {name + ':':19s}{min(values):.4%} (lowest of {len(values)} runs)")
    print(f"post-processing / forward (ours fp32):     {median('ours', 'postprocess') / median('ours', 'forward'):.3f}")
    print(f"peak RSS ours / transformers:              {peak('ours') / peak('transformers'):.3f}")


if __name__ == "__main__":
    main()
