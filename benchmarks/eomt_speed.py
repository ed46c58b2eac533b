"""EoMT end to end on CPU, fp32: this package vs transformers' EoMT with the same random weights, and EoMT-L at 640
vs this package's Mask2Former Swin-L at its card's input (800 / 1333), on one COCO image, in one run.

Run with the oracle environment (it sees both packages):
    .venv-oracle/bin/python benchmarks/eomt_speed.py --runs 3
    .venv-oracle/bin/python benchmarks/eomt_speed.py --model small --no-mask2former --runs 5   # quicker under load

A random-weight ``EomtForUniversalSegmentation`` (EoMT-L: DINOv2 ViT-L/16, 4 registers, 640 x 640, 200 queries, 133
classes, masked attention annealed away as in the released checkpoints) is built in memory and its state dict
converted into this package's network (``checkpoints/eomt.py``). Each case is called once to warm up, then timed,
interleaved:
- transformers: ``EomtImageProcessor`` (long side 640, ``do_pad``) + forward + ``post_process_panoptic_segmentation``;
- this package: ``Predictor`` (decode, resize, pad + forward + panoptic fusion at the image size, the outputs built);
- both forwards alone on the same pixels;
- this package's Mask2Former Swin-L (random weights) through the same ``Predictor`` (``--no-mask2former``: skipped).
Then the phases apart, per implementation: preprocessing (``EomtImageProcessor`` / ``Predictor.prepare``), forward,
and panoptic post-processing (``post_process_panoptic_segmentation`` / ``Predictor.postprocess``, outputs built) on
the random network's logits (which keep no query at the 0.8 object threshold) and on ``annotation_logits`` (one
confident query per annotated segment of the image, 38 kept, 32 segments), with the end-to-end ratio projected for a
forward 5x faster (bf16 on a CPU with AMX: a projection, not a measurement). ``--model``: ViT widths ``large``
(EoMT-L, default), ``base`` or ``small`` (same 200 queries, 133 classes, 640 input, so the same pre- and
post-processing work). ``--bf16``: also both pipelines and forwards under bf16 (``Predictor(precision="bf16")``;
transformers' model under ``torch.autocast``, its logits widened to float32 for post-processing), timed only where it
means something: on a CPU with native bf16 (AMX; ``benchmarks/amx_check.sh``). Prints the median of each and the
ratios. Torch threads: ``--threads`` (default: torch's).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the oracle env sees .venv's packages but not its editable install
IMAGE = REPO.parent / "shared" / "data" / "coco" / "val2017" / "000000439180.jpg"


# hidden size, layers, heads of the DINOv2 ViT under EoMT
MODELS = {"large": (1024, 24, 16), "base": (768, 12, 12), "small": (384, 12, 6)}


def build_pair(model_size: str = "large"):
    """(transformers model, processor, this package's config, network) with the same random weights."""
    import torch
    import transformers

    from modelscope_plugin.builders import build_eomt
    from modelscope_plugin.checkpoints.eomt import convert_hf_eomt
    from modelscope_plugin.checkpoints.io import load_strict
    from modelscope_plugin.model_dirs.eomt import config_from_hf_eomt

    torch.manual_seed(0)
    labels = {index: f"class_{index}" for index in range(133)}
    hidden_size, layers, heads = MODELS[model_size]
    hf_config = transformers.EomtConfig(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                                        intermediate_size=4 * hidden_size, id2label=labels,
                                        label2id={name: index for index, name in labels.items()})
    model = transformers.EomtForUniversalSegmentation(hf_config).eval()
    model.attn_mask_probs.zero_()
    processor = transformers.EomtImageProcessor(size={"shortest_edge": 640, "longest_edge": 640}, do_pad=True)
    values = hf_config.to_dict()
    config = config_from_hf_eomt(values)
    network = build_eomt(config)
    state_dict, _ = convert_hf_eomt(model.state_dict(), values["model_type"])
    load_strict(network, state_dict, checkpoint_name="random EoMT-L")
    return model, processor, config, network.eval()


def annotation_logits(name: str, num_queries: int = 200, image_size: int = 640, seed: int = 0):
    """Logits a trained EoMT might give for a COCO val2017 image of ``shared/data``: (Q, 134) class logits and
    (Q, S/4, S/4) mask logits, one confident query per annotated panoptic segment (mask logit 16 * (covered
    fraction - 1/2) + N(0, 1) on the stride-4 grid of the padded input), six weaker duplicates shifted by 3 cells
    (kept by the object threshold, dropped by the overlap test), the other queries no-object. For timing
    post-processing on a realistic number of segments, which random weights do not give."""
    import json

    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from modelscope_plugin.inference.preprocess import transformers_rescaled_size

    coco = REPO.parent / "shared" / "data" / "coco"
    panoptic = json.loads((coco / "annotations" / "panoptic_val2017_subset.json").read_text())
    annotation = next(item for item in panoptic["annotations"] if item["file_name"] == f"{name}.png")
    label_of = {category["id"]: index for index, category in enumerate(panoptic["categories"])}
    # RGB-encoded segment ids: id = R + 256 G + 256^2 B
    rgb = np.asarray(Image.open(coco / "panoptic_val2017" / f"{name}.png").convert("RGB")).astype(np.int64)
    ids = torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2])
    height, width = ids.shape
    resized = transformers_rescaled_size(height, width, image_size, image_size)
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(num_queries, len(label_of) + 1, generator=generator)
    class_logits[:, -1] = 9.0
    mask_logits = torch.randn(num_queries, image_size // 4, image_size // 4, generator=generator) - 8.0
    for query, segment in enumerate(annotation["segments_info"]):
        mask = (ids == segment["id"]).float()[None, None]
        # (1, 1, H, W) -> resized, padded to the square input, covered fraction per stride-4 cell
        mask = F.interpolate(mask, size=resized, mode="bilinear", align_corners=False)
        mask = F.pad(mask, (0, image_size - resized[1], 0, image_size - resized[0]))
        fraction = F.avg_pool2d(mask, 4)[0, 0]
        mask_logits[query] += 8.0 + 16.0 * (fraction - 0.5)
        class_logits[query, -1] = 0.0
        class_logits[query, label_of[segment["category_id"]]] = 9.0
        if query < 6:  # a weaker duplicate, shifted
            duplicate = len(annotation["segments_info"]) + query
            mask_logits[duplicate] = mask_logits[query].roll(3, dims=1)
            class_logits[duplicate, -1] = 0.0
            class_logits[duplicate, label_of[segment["category_id"]]] = 7.5
    return class_logits, mask_logits


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--model", choices=sorted(MODELS), default="large", help="ViT widths under EoMT")
    parser.add_argument("--no-mask2former", action="store_true", help="skip Mask2Former Swin-L")
    parser.add_argument("--bf16", action="store_true", help="also time bf16 (CPUs with native bf16 only)")
    args = parser.parse_args(argv)
    from types import SimpleNamespace

    import torch
    from PIL import Image

    from modelscope_plugin.builders import build_mask2former
    from modelscope_plugin.config import swin_large_coco_panoptic
    from modelscope_plugin.inference.predictor import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    image = Image.open(IMAGE).convert("RGB")
    model, processor, config, network = build_pair(args.model)
    predictor = Predictor(network, config)
    name = f"EoMT-{args.model[0].upper()}"
    stuff_classes = list(range(80, 133))
    target_sizes = [(image.height, image.width)]

    def transformers_end_to_end():
        with torch.inference_mode():
            inputs = processor(images=image, return_tensors="pt")
            output = model(pixel_values=inputs["pixel_values"])
            return processor.post_process_panoptic_segmentation(
                output, target_sizes=target_sizes, stuff_classes=stuff_classes)

    prepared = predictor.prepare(image, "panoptic")
    pixels = prepared.network_input()
    parameters = predictor.parameters(task="panoptic")
    with torch.inference_mode():
        their_output = model(pixel_values=pixels)
        our_output = predictor.run(pixels)
    class_logits, mask_logits = annotation_logits(IMAGE.stem)
    annotated = SimpleNamespace(class_queries_logits=class_logits[None], masks_queries_logits=mask_logits[None])

    def transformers_postprocess(output):
        with torch.inference_mode():
            return processor.post_process_panoptic_segmentation(
                output, target_sizes=target_sizes, stuff_classes=stuff_classes)

    def ours_postprocess(class_logits, mask_logits):
        with torch.inference_mode():
            return predictor.postprocess(prepared, class_logits, mask_logits, parameters)

    cases = {
        f"transformers {name} end to end": transformers_end_to_end,
        f"ours {name} end to end": lambda: predictor(image, task="panoptic"),
        f"transformers {name} preprocess": lambda: processor(images=image, return_tensors="pt"),
        f"ours {name} preprocess": lambda: predictor.prepare(image, "panoptic"),
        f"transformers {name} forward": lambda: transformers_forward(model, pixels),
        f"ours {name} forward": lambda: predictor.run(pixels),
        f"transformers {name} post, network logits": lambda: transformers_postprocess(their_output),
        f"ours {name} post, network logits": lambda: ours_postprocess(our_output.class_logits[0],
                                                                      our_output.mask_logits[0]),
        f"transformers {name} post, annotation logits": lambda: transformers_postprocess(annotated),
        f"ours {name} post, annotation logits": lambda: ours_postprocess(class_logits, mask_logits),
    }
    if args.bf16:
        bf16_predictor = Predictor(network, config, precision="bf16")

        def transformers_bf16_forward():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                output = model(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"])
            output.class_queries_logits = output.class_queries_logits.float()
            output.masks_queries_logits = output.masks_queries_logits.float()
            return output

        cases[f"transformers {name} bf16 end to end"] = lambda: transformers_postprocess(transformers_bf16_forward())
        cases[f"ours {name} bf16 end to end"] = lambda: bf16_predictor(image, task="panoptic")
        cases[f"ours {name} bf16 forward"] = lambda: bf16_predictor.run(pixels)
    if not args.no_mask2former:
        swin_config = swin_large_coco_panoptic()
        swin_predictor = Predictor(build_mask2former(swin_config).eval(), swin_config)
        cases["ours Mask2Former Swin-L 800/1333 end to end"] = lambda: swin_predictor(image, task="panoptic")
    for function in cases.values():  # warm-up
        function()
    times = {case: [] for case in cases}
    for _ in range(args.runs):  # interleaved, so load drifts hit all alike
        for case, function in cases.items():
            times[case].append(timed(function))
    medians = {case: statistics.median(values) for case, values in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {image.width}x{image.height}, "
          f"{name}, {args.runs} runs (median, warm)")
    for case, value in medians.items():
        print(f"  {case:50s} {value:8.3f} s")
    segments = len(ours_postprocess(class_logits, mask_logits)["masks"])
    print(f"annotation logits: {int(kept_queries(class_logits))} queries kept, {segments} segments")

    def ratio(ours: str, theirs: str) -> float:
        return medians[f"ours {name} {ours}"] / medians[f"transformers {name} {theirs}"]

    print(f"ours / transformers end to end: {ratio('end to end', 'end to end'):.2f} (target <= 0.8)")
    print(f"ours / transformers forward:    {ratio('forward', 'forward'):.2f} (target <= 1.0)")
    if args.bf16:
        print(f"bf16: ours / transformers bf16 end to end: {ratio('bf16 end to end', 'bf16 end to end'):.2f}; "
              f"ours bf16 / transformers fp32 end to end: {ratio('bf16 end to end', 'end to end'):.2f}; "
              f"ours bf16 / ours fp32 forward: "
              f"{medians[f'ours {name} bf16 forward'] / medians[f'ours {name} forward']:.2f}")
    print(f"ours / transformers preprocess: {ratio('preprocess', 'preprocess'):.2f}; post-processing, network "
          f"logits: {ratio('post, network logits', 'post, network logits'):.2f}; annotation logits: "
          f"{ratio('post, annotation logits', 'post, annotation logits'):.2f}")
    for speedup in (1, 5):
        phases = {side: (medians[f"{side} {name} preprocess"] + medians[f"{side} {name} forward"] / speedup
                         + medians[f"{side} {name} post, annotation logits"]) for side in ("ours", "transformers")}
        label = "measured phases" if speedup == 1 else f"projection, forward {speedup}x faster"
        print(f"end to end from the phases (annotation logits), {label}: ours {phases['ours']:.3f} s, transformers "
              f"{phases['transformers']:.3f} s, ratio {phases['ours'] / phases['transformers']:.2f}")
    if not args.no_mask2former:
        print(f"{name} 640 / Mask2Former Swin-L 800x1333 (ours, end to end): "
              f"{medians[f'ours {name} end to end'] / medians['ours Mask2Former Swin-L 800/1333 end to end']:.2f}")


def transformers_forward(model, pixels):
    import torch

    with torch.inference_mode():
        return model(pixel_values=pixels)


def kept_queries(class_logits, threshold: float = 0.8) -> int:
    """Queries whose best class is not no-object and scores above the object threshold."""
    scores, labels = class_logits.softmax(-1).max(-1)
    return int((labels.ne(class_logits.shape[-1] - 1) & (scores > threshold)).sum())


if __name__ == "__main__":
    main()
