"""bf16 against fp32 on TRAINED weights (issue 28, item 1): should ``precision="auto"`` be the default?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision_agreement.py --scenes 40
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision_agreement.py --scenes 3 --real-bf16 3

For each shipped demo model (``model_cards/demo/*``: the only trained weights in this checkout) the held-out scenes
its card states (seed 1, the first ``--scenes`` of them, written as ``tests/test_demo.py`` writes them) go through
``Predictor`` in fp32 and in bf16: one forward per precision and image, post-processed with the pipeline's default
thresholds (what a user sees) and, for the card metric, as ``evaluate`` does (instance: ``score_thr=0``). Reported:
the card metric (PQ / mask AP) in both precisions, and the pixel agreement of bf16 with fp32 (``bf16_audit.agreement``:
same class or none, and also in matched instances), mean and minimum over the scenes, for the model's own task and,
for the panoptic model, its semantic output too.

bf16 matrix products are emulated where the CPU has no native bf16 units (``bf16_audit.DtypeAudit``: bf16 operands,
fp32 sums, bf16 result, what AMX / AVX-512 BF16 kernels compute up to the order of the sums); ``--real-bf16 N`` also
runs the first N scenes through the real oneDNN bf16 kernels (slow reference loops on such a CPU, but these models are
small: about 2 s a scene) and compares their labels with the emulation's and fp32's; with N >= the scenes, the card
metric is also computed from the real kernels' results.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "benchmarks"))
from bf16_audit import DtypeAudit, agreement  # noqa: E402

HELD_OUT_SEED = 1  # the cards' held-out split (tests/test_demo.py)


def card_metric(task: str, scores: Dict[str, Any]) -> float:
    """PQ (percent) or mask AP (COCO's fraction, in percent), as the cards state them."""
    return scores["PQ"] if task == "panoptic" else 100 * scores["segm"]["AP"]


def run_precision(predictor, prepared, parameters, emulate: bool):
    """{(task, "shown" | "metric"): result} from one forward of ``predictor`` on ``prepared``."""
    audit = DtypeAudit(emulate_bf16=emulate) if emulate else None
    if audit:
        audit.__enter__()
    try:
        output = predictor.run(prepared.tensor[None], None)
        results = {}
        for key, chosen in parameters.items():
            results[key] = predictor.postprocess(prepared, output.class_logits[0], output.mask_logits[0], chosen)
    finally:
        if audit:
            audit.__exit__(None, None, None)
    return results


def measure(name: str, directory: Path, task: str, scenes: int, real_bf16: int, data: Path) -> Dict[str, Any]:
    from modelscope_plugin.apps import demo
    from modelscope_plugin.evaluation.evaluate import annotation_categories, evaluate_rows
    from modelscope_plugin.inference.precision import cpu_has_native_bf16
    from modelscope_plugin.inference.predictor import Predictor
    from modelscope_plugin.model_dirs.load import load_model

    split = demo.demo_scenes(data, scenes, HELD_OUT_SEED, "val")
    if task == "panoptic":
        rows, annotation_file = split.panoptic_rows(), split.panoptic_json
    else:
        rows, annotation_file = split.instance_rows(), split.instances_json
    rows = list(rows)[:scenes]
    config, network = load_model(str(directory))
    network.eval()
    full = Predictor(network, config, torch.device("cpu"), precision="fp32")
    half = Predictor(network, config, torch.device("cpu"), precision="bf16")
    parameters = {(task, "shown"): full.parameters(task=task)}
    if task == "instance":
        parameters[(task, "metric")] = full.parameters(task=task, score_thr=0.0)
    else:
        parameters[("semantic", "shown")] = full.parameters(task="semantic")
    emulate = not cpu_has_native_bf16()
    per_image = []
    metric_results = {"fp32": [], "bf16": []}
    seconds = {"fp32": 0.0, "bf16": 0.0}
    for index, row in enumerate(rows):
        prepared = full.prepare(row["image_path"])
        started = time.perf_counter()
        reference = run_precision(full, prepared, parameters, emulate=False)
        seconds["fp32"] += time.perf_counter() - started
        started = time.perf_counter()
        lowered = run_precision(half, prepared, parameters, emulate=emulate)
        seconds["bf16"] += time.perf_counter() - started
        entry = {"image": Path(row["image_path"]).name}
        for key in parameters:
            if key[1] == "shown":
                entry[key[0]] = agreement(lowered[key], reference[key], prepared.original_size)
        metric_key = (task, "metric") if task == "instance" else (task, "shown")
        metric_results["fp32"].append(reference[metric_key])
        metric_results["bf16"].append(lowered[metric_key])
        if index < real_bf16 and emulate:
            started = time.perf_counter()
            real = run_precision(half, prepared, parameters, emulate=False)
            entry["real_bf16_seconds"] = round(time.perf_counter() - started, 1)
            for key in parameters:
                if key[1] == "shown":
                    entry[f"{key[0]}_real_vs_emulated"] = agreement(real[key], lowered[key], prepared.original_size)
                    entry[f"{key[0]}_real_vs_fp32"] = agreement(real[key], reference[key], prepared.original_size)
            if real_bf16 >= len(rows):  # every scene: the card metric with the real kernels too
                metric_results.setdefault("bf16_real", []).append(real[metric_key])
        per_image.append(entry)
        print(json.dumps(entry), flush=True)
    categories = annotation_categories(str(annotation_file))
    metric_arguments = ({"categories": categories} if task == "panoptic"
                        else {"annotation_file": str(annotation_file), "categories": categories})
    metrics = {precision: card_metric(task, evaluate_rows(rows, results, task, **metric_arguments))
               for precision, results in metric_results.items()}
    summary = {"model": name, "task": task, "scenes": len(rows), "bf16_emulated": emulate,
               "card_metric": "PQ" if task == "panoptic" else "mask AP", "fp32": metrics["fp32"],
               "bf16": metrics["bf16"], "bf16_real": metrics.get("bf16_real"),
               "seconds": {key: round(value, 1) for key, value in seconds.items()}}
    for key in parameters:
        if key[1] == "shown":
            for kind in ("class", "instance"):
                values = [entry[key[0]][kind] for entry in per_image]
                summary[f"{key[0]}_{kind}_mean"] = float(np.mean(values))
                summary[f"{key[0]}_{kind}_min"] = float(np.min(values))
            summary[f"{key[0]}_images_identical"] = sum(entry[key[0]]["class"] == 1.0 for entry in per_image)
            for kind in ("real_vs_emulated", "real_vs_fp32"):
                values = [entry[f"{key[0]}_{kind}"]["class"] for entry in per_image if f"{key[0]}_{kind}" in entry]
                if values:
                    summary[f"{key[0]}_class_{kind}_mean"] = float(np.mean(values))
                    summary[f"{key[0]}_class_{kind}_min"] = float(np.min(values))
    return {"summary": summary, "per_image": per_image}


def main(argv=None) -> List[Dict[str, Any]]:
    from modelscope_plugin.apps import demo

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(demo.DEMO_TASKS), choices=sorted(demo.DEMO_TASKS))
    parser.add_argument("--scenes", type=int, default=40, help="held-out scenes of seed 1 (the cards: 40 and 200)")
    parser.add_argument("--real-bf16", type=int, default=0,
                        help="also run the first N scenes through the real bf16 kernels (slow without native bf16)")
    parser.add_argument("--data", type=Path, default=None, help="folder for the scenes (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=None, help="JSON report")
    arguments = parser.parse_args(argv)
    from modelscope_plugin.inference.precision import cpu_has_native_bf16

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{cpu_has_native_bf16()}, threads {torch.get_num_threads()}", flush=True)
    reports = []
    with tempfile.TemporaryDirectory() as temporary:
        data = arguments.data or Path(temporary)
        for name in arguments.models:
            directory = demo.DEMO_MODELS / name
            report = measure(name, directory, demo.DEMO_TASKS[name], arguments.scenes, arguments.real_bf16,
                             data / name)
            print(json.dumps(report["summary"]), flush=True)
            reports.append(report)
    if arguments.output:
        arguments.output.write_text(json.dumps(reports, indent=1))
    return reports


if __name__ == "__main__":
    main()
