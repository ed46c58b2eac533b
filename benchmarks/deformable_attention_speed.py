"""Multi-scale deformable attention: this package's gather (embedding_bag) vs the grid_sample-per-level
formulation of Deformable DETR / transformers / EasyCV's pure-PyTorch path, interleaved in one run.

    .venv/bin/python benchmarks/deformable_attention_speed.py --threads 2 --runs 5

Sizes are Mask2Former's pixel-decoder encoder at an 800x1216 input: 3 levels (stride 32, 16, 8), every token a
query, 8 heads of 32 channels, 4 points per level.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_layers import grid_sample_reference  # noqa: E402

from modelscope_plugin.modeling.layers.ms_deform_attn import multi_scale_deformable_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    generator = torch.Generator().manual_seed(0)
    shapes = [(25, 38), (50, 76), (100, 152)]
    tokens = sum(height * width for height, width in shapes)
    heads, head_dim, points = 8, 32, 4
    value = torch.randn(1, tokens, heads, head_dim, generator=generator)
    locations = torch.rand(1, tokens, heads, len(shapes), points, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(1, tokens, heads, len(shapes), points, generator=generator).softmax(-1)
    timings = {"grid_sample per level": [], "this package (embedding_bag)": []}
    functions = {"grid_sample per level": grid_sample_reference,
                 "this package (embedding_bag)": multi_scale_deformable_attention}
    with torch.inference_mode():
        outputs = {name: function(value, shapes, locations, weights) for name, function in functions.items()}
        for _ in range(arguments.runs):
            for name, function in functions.items():
                start = time.perf_counter()
                function(value, shapes, locations, weights)
                timings[name].append(time.perf_counter() - start)
    difference = (outputs["grid_sample per level"] - outputs["this package (embedding_bag)"]).abs().max().item()
    print(f"{tokens} queries, {arguments.threads} threads, median of {arguments.runs}; "
          f"max |difference| {difference:.1e}")
    medians = {name: statistics.median(values) for name, values in timings.items()}
    for name, median in medians.items():
        print(f"  {name:30s} {median * 1000:8.1f} ms")
    print("  ratio ours / grid_sample: "
          f"{medians['this package (embedding_bag)'] / medians['grid_sample per level']:.3f}")


if __name__ == "__main__":
    main()
