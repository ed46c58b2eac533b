"""EoMT end to end on CPU, fp32: this package vs transformers' EoMT with the same random weights, and EoMT-L at 640
vs this package's Mask2Former Swin-L at its card's input (800 / 1333), on one COCO image, in one run.

Run with the oracle environment (it sees both packages):
    .venv-oracle/bin/python benchmarks/eomt_speed.py --runs 3

A random-weight ``EomtForUniversalSegmentation`` (EoMT-L: DINOv2 ViT-L/16, 4 registers, 640 x 640, 200 queries, 133
classes, masked attention annealed away as in the released checkpoints) is built in memory and its state dict
converted into this package's network (``checkpoints/eomt.py``). Each case is called once to warm up, then timed,
interleaved:
- transformers: ``EomtImageProcessor`` (long side 640, ``do_pad``) + forward + ``post_process_panoptic_segmentation``;
- this package: ``Predictor`` (decode, resize, pad + forward + panoptic fusion at the image size, the outputs built);
- both forwards alone on the same pixels;
- this package's Mask2Former Swin-L (random weights) through the same ``Predictor``.
Prints the median of each and the ratios. Torch threads: ``--threads`` (default: torch's).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the oracle env sees .venv's packages but not its editable install
IMAGE = REPO.parent / "shared" / "data" / "coco" / "val2017" / "000000439180.jpg"


def build_pair():
    """(transformers model, processor, this package's config, network) with the same random weights."""
    import torch
    import transformers

    from modelscope_plugin.builders import build_eomt
    from modelscope_plugin.checkpoints.eomt import convert_hf_eomt
    from modelscope_plugin.checkpoints.io import load_strict
    from modelscope_plugin.model_dirs.eomt import config_from_hf_eomt

    torch.manual_seed(0)
    labels = {index: f"class_{index}" for index in range(133)}
    hf_config = transformers.EomtConfig(id2label=labels, label2id={name: index for index, name in labels.items()})
    model = transformers.EomtForUniversalSegmentation(hf_config).eval()
    model.attn_mask_probs.zero_()
    processor = transformers.EomtImageProcessor(size={"shortest_edge": 640, "longest_edge": 640}, do_pad=True)
    values = hf_config.to_dict()
    config = config_from_hf_eomt(values)
    network = build_eomt(config)
    state_dict, _ = convert_hf_eomt(model.state_dict(), values["model_type"])
    load_strict(network, state_dict, checkpoint_name="random EoMT-L")
    return model, processor, config, network.eval()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    import torch
    from PIL import Image

    from modelscope_plugin.builders import build_mask2former
    from modelscope_plugin.config import swin_large_coco_panoptic
    from modelscope_plugin.inference.predictor import Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    image = Image.open(IMAGE).convert("RGB")
    model, processor, config, network = build_pair()
    predictor = Predictor(network, config)
    swin_config = swin_large_coco_panoptic()
    swin_predictor = Predictor(build_mask2former(swin_config).eval(), swin_config)

    def transformers_end_to_end():
        with torch.inference_mode():
            inputs = processor(images=image, return_tensors="pt")
            output = model(pixel_values=inputs["pixel_values"])
            return processor.post_process_panoptic_segmentation(
                output, target_sizes=[(image.height, image.width)], stuff_classes=list(range(80, 133)))

    pixels = predictor.prepare(image, "panoptic").network_input()

    def transformers_forward():
        with torch.inference_mode():
            return model(pixel_values=pixels)

    def ours_forward():
        with torch.inference_mode():
            return network(pixels)

    cases = {
        "transformers EoMT-L end to end": transformers_end_to_end,
        "ours EoMT-L end to end": lambda: predictor(image, task="panoptic"),
        "transformers EoMT-L forward": transformers_forward,
        "ours EoMT-L forward": ours_forward,
        "ours Mask2Former Swin-L 800/1333 end to end": lambda: swin_predictor(image, task="panoptic"),
    }
    for function in cases.values():  # warm-up
        function()
    times = {name: [] for name in cases}
    for _ in range(args.runs):  # interleaved, so load drifts hit all alike
        for name, function in cases.items():
            times[name].append(timed(function))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {image.width}x{image.height}, "
          f"{args.runs} runs (median, warm)")
    for name, value in medians.items():
        print(f"  {name:45s} {value:7.2f} s")
    end_to_end = medians["ours EoMT-L end to end"] / medians["transformers EoMT-L end to end"]
    forward = medians["ours EoMT-L forward"] / medians["transformers EoMT-L forward"]
    print(f"ours / transformers end to end: {end_to_end:.2f} (target <= 0.8)")
    print(f"ours / transformers forward:    {forward:.2f} (target <= 1.0)")
    print(f"EoMT-L 640 / Mask2Former Swin-L 800x1333 (ours, end to end): "
          f"{medians['ours EoMT-L end to end'] / medians['ours Mask2Former Swin-L 800/1333 end to end']:.2f}")


if __name__ == "__main__":
    main()
