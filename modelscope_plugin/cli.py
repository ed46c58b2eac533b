"""``modelscope-seg``: command line. Exit codes: 0 success, 2 usage error, 1 a failed input or model."""
import argparse
import json
import sys
from pathlib import Path


def segment(arguments) -> int:
    import numpy as np
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    from . import visualization
    from .preprocessing import load_image

    segmenter = pipeline(Tasks.image_segmentation, model=arguments.model, device=arguments.device)
    output = Path(arguments.output)
    output.mkdir(parents=True, exist_ok=True)
    for image in arguments.images:
        parameters = {"task": arguments.task} if arguments.task else {}
        result = segmenter(image, **parameters)
        stem = Path(image).stem
        visualization.draw_overlay(load_image(image), result).save(output / f"{stem}_overlay.png")
        (output / f"{stem}.json").write_text(json.dumps(visualization.segments_to_json(result), indent=1))
        print(f"{image}: {len(result['masks'])} segments")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="modelscope-seg", description="Mask2Former / FastInst segmentation for ModelScope")
    commands = parser.add_subparsers(dest="command", required=True)
    segment_parser = commands.add_parser("segment", help="images -> overlays and JSON (masks as COCO RLE)")
    segment_parser.add_argument("images", nargs="+")
    segment_parser.add_argument("--model", required=True, help="hub id (damo/... or iic/...) or model directory")
    segment_parser.add_argument("--task", choices=("panoptic", "semantic", "instance"))
    segment_parser.add_argument("--device", default="cpu")
    segment_parser.add_argument("--output", default="outputs/segment")
    arguments = parser.parse_args(argv)
    return {"segment": segment}[arguments.command](arguments)


if __name__ == "__main__":
    sys.exit(main())
