"""FastInst R50-D3 vs Mask2Former R50: whole-pipeline time on this CPU, measured in one run, and the FLOP ratio.

    .venv/bin/python benchmarks/fastinst_vs_mask2former.py --runs 3

Each model runs at its card's default input (FastInst: short side 640, the hub card; Mask2Former R50: 800, the
``damo/cv_r50_panoptic-segmentation_cocopan`` card) through ``pipeline(Tasks.image_segmentation, model=dir)``
(load, resize, normalise, pad, forward, instance / panoptic post-processing) on a COCO image, with random weights
in each hub layout. Runs are interleaved (one of each per round) so a change in machine load hits both; the
medians and their ratio are printed. FLOPs are counted with ``torch.utils.flop_counter`` for the network alone,
at each card's input and at one equal input.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
IMAGE = REPO.parent / "shared" / "data" / "coco" / "val2017" / "000000439180.jpg"


def write_model_dirs(root: Path):
    from modelscope_plugin.apps import demo
    from modelscope_plugin.builders import build_fastinst, build_mask2former
    from modelscope_plugin.config import fastinst_r50_d3_coco, resnet50_coco_panoptic
    from modelscope_plugin.model_dirs.fastinst import write_hub_dir

    torch.manual_seed(0)
    fastinst_config = fastinst_r50_d3_coco()
    fastinst_dir = write_hub_dir(root / "fastinst", fastinst_config, build_fastinst(fastinst_config).eval())
    mask2former_config = resnet50_coco_panoptic()
    mask2former = build_mask2former(mask2former_config).eval()
    demo.shape_random_weights(mask2former)
    mask2former_dir = demo.write_model_dir(root / "mask2former", mask2former_config, mask2former)
    return fastinst_dir, mask2former_dir


def network_flops(network, height: int, width: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(torch.zeros(1, 3, height, width))
    return counter.get_total_flops()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-thr", type=float, default=0.5,
                        help="FastInst's score threshold (the card's 0.5; 0 upsamples all 100 masks, the worst case)")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)

    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    import modelscope_plugin  # noqa: F401  (registers the pipelines)

    with tempfile.TemporaryDirectory() as root:
        fastinst_dir, mask2former_dir = write_model_dirs(Path(root))
        fastinst = pipeline(Tasks.image_segmentation, model=str(fastinst_dir), device="cpu")
        mask2former = pipeline(Tasks.image_segmentation, model=str(mask2former_dir), device="cpu")
        times = {"fastinst": [], "mask2former": []}
        arguments_of = {"fastinst": {"score_thr": arguments.score_thr}, "mask2former": {}}
        for round_index in range(arguments.runs + 1):
            for name, segmenter in (("fastinst", fastinst), ("mask2former", mask2former)):
                start = time.perf_counter()
                result = segmenter(str(IMAGE), **arguments_of[name])
                if round_index > 0:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
                if name == "fastinst":
                    fastinst_instances = len(result["masks"])
        fastinst_prepared = fastinst.preprocess(str(IMAGE))["image"]
        mask2former_prepared = mask2former.preprocess(str(IMAGE))["image"]
        flops = {
            "fastinst_card": network_flops(fastinst.model.network, *fastinst_prepared.padded_size),
            "mask2former_card": network_flops(mask2former.model.network, *mask2former_prepared.padded_size),
            "fastinst_equal": network_flops(fastinst.model.network, *mask2former_prepared.padded_size),
        }
    fastinst_median, mask2former_median = statistics.median(times["fastinst"]), statistics.median(times["mask2former"])
    print(f"image {IMAGE.name}; FastInst input {fastinst_prepared.padded_size}, "
          f"Mask2Former input {mask2former_prepared.padded_size}; "
          f"{arguments.threads} threads, {arguments.runs} interleaved runs; FastInst score_thr {arguments.score_thr} "
          f"keeps {fastinst_instances} instances")
    print(f"whole pipeline, median seconds: FastInst R50-D3 {fastinst_median:.2f}, "
          f"Mask2Former R50 {mask2former_median:.2f}, "
          f"ratio {mask2former_median / fastinst_median:.2f}x")
    print(f"GFLOPs at the cards' inputs: FastInst {flops['fastinst_card'] / 1e9:.1f}, "
          f"Mask2Former {flops['mask2former_card'] / 1e9:.1f}, "
          f"ratio {flops['mask2former_card'] / flops['fastinst_card']:.2f}x")
    print(f"GFLOPs at an equal input {mask2former_prepared.padded_size}: FastInst {flops['fastinst_equal'] / 1e9:.1f}, "
          f"ratio {flops['mask2former_card'] / flops['fastinst_equal']:.2f}x")


if __name__ == "__main__":
    main()
