"""Reference ("oracle") outputs of Hugging Face transformers' EomtForUniversalSegmentation with random weights.

Runs inside the oracle venv (``.venv-oracle``, transformers 5 on the runtime venv's torch). Two subcommands:

``make``  builds a small ``EomtForUniversalSegmentation`` (or, with ``--dinov3``, ``EomtDinov3ForUniversal
          Segmentation``; sizes from the options), gives it seeded random weights
          shaped so that its outputs are not degenerate (see ``shape_weights``), sets the ``attn_mask_probs``
          buffer and writes it with ``save_pretrained`` (config.json + model.safetensors, or pytorch_model.bin with
          ``--torch-bin``).
``run``   loads such a folder and stores, for ``pixel_values`` float32 [B,3,S,S] in an ``.npz``,
          ``class_queries_logits`` [B,Q,K+1] and ``masks_queries_logits`` [B,Q,S/4,S/4] (patch 16) plus
          ``attn_mask_probs`` as loaded and ``meta_json``.
``preprocess``  runs ``EomtImageProcessor`` (torchvision backend, resize the long side to ``--size``, ``do_pad``)
          on each image and stores ``pixel_values_<i>`` [3,S,S].
``windows``  semantic inference as transformers does it on split images: ``EomtImageProcessor`` with
          ``do_split_image`` (short side to the model's image size, no long-side cap) on each image, the model on
          its windows, ``post_process_semantic_segmentation``; stores per image ``pixel_values_<i>`` [N,3,S,S],
          ``patch_offsets_<i>`` [N,3], the logits and ``segmentation_scores_<i>`` [C,H,W] at the original size.
``loss``  the model in training mode on ``pixel_values`` with ``mask_labels_<b>`` / ``class_labels_<b>`` from an npz:
          its total loss (every query block's prediction and the final one, each matched and weighted), with the
          random points it draws replaced, call by call, by ``draw_<i>`` (other random draws are left as they are).
``postprocess``  ``EomtImageProcessor.post_process_{panoptic,instance}_segmentation`` on given logits
          (``class_queries_logits``, ``masks_queries_logits``, ``target_size`` in an npz); stores the segmentation
          maps and the segments as JSON.

Example::

    .venv-oracle/bin/python tests/oracles/eomt_oracle.py make --hidden-size 64 --layers 4 --seed 0 \\
        --attn-mask-probs 1,1 --out-dir /tmp/eomt_tiny
    .venv-oracle/bin/python tests/oracles/eomt_oracle.py run --model-dir /tmp/eomt_tiny \\
        --pixels /tmp/in.npz --result /tmp/out.npz
"""
import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn


def _normal(shape, generator, std=1.0):
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


@torch.no_grad()
def shape_weights(model, generator):
    """Moves HF's init away from values that would hide mistakes, and makes the outputs non-degenerate.

    - every LayerNorm gets weight 1 + N(0, 0.1) and bias N(0, 0.1) (HF: 1 and 0, which would hide swapped norms);
    - the register tokens (HF: zeros) and the class token get N(0, 1); the layer scales (HF: all 1) N(0.5, 0.2)
      per channel, so swapping the attention and MLP scales shows;
    - the class head is scaled so the class logits spread over about +-10 (queries disagree on classes), and for
      DINOv3 the queries are 8x larger;
    - the last scale layer's LayerNorm keeps channel 0 constant (weight 0, bias 1), and the mask head's last bias
      on that channel is -sqrt(hidden) / 8, with the head's last weights 4x HF's: mask logits then have a negative
      offset against which each query's spatial signal makes partial masks, so masked attention restricts each
      query to part of the image.
    """
    hidden = model.config.hidden_size
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            # PyTorch's default (kaiming-uniform) init, which EoMT-DINOv2's _init_weights uses too; EoMT-DINOv3's
            # normal(0, 0.02) would leave every residual branch and logit near zero
            module.reset_parameters()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.copy_(1.0 + _normal(module.weight.shape, generator, 0.1))
            module.bias.copy_(_normal(module.bias.shape, generator, 0.1))
    for layer in model.layers:
        layer.layer_scale1.lambda1.copy_(0.5 + _normal((hidden,), generator, 0.2))
        layer.layer_scale2.lambda1.copy_(0.5 + _normal((hidden,), generator, 0.2))
    model.embeddings.register_tokens.copy_(_normal(model.embeddings.register_tokens.shape, generator))
    model.embeddings.cls_token.copy_(_normal(model.embeddings.cls_token.shape, generator))
    model.class_predictor.weight.mul_(8.0)
    if model.config.model_type == "eomt_dinov3":
        # without position embeddings the queries drift together (one class for all); larger ones stay apart
        model.query.weight.mul_(8.0)
    last_norm = model.upscale_block.block[-1].layernorm2d
    last_norm.weight[0] = 0.0
    last_norm.bias[0] = 1.0
    model.mask_head.fc3.weight.mul_(4.0)
    model.mask_head.fc3.bias[0] = -hidden ** 0.5 / 8


def command_make(args):
    import transformers

    torch.manual_seed(args.seed)
    sizes = dict(
        hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        image_size=args.image_size, patch_size=args.patch_size, num_register_tokens=args.registers,
        num_blocks=args.num_blocks, num_queries=args.queries,
        id2label={index: f"class_{index}" for index in range(args.labels)},
        label2id={f"class_{index}": index for index in range(args.labels)},
    )
    if args.dinov3:
        config = transformers.EomtDinov3Config(**sizes, intermediate_size=4 * args.hidden_size,
                                               rope_parameters={"rope_type": "default", "rope_theta": 100.0})
        model = transformers.EomtDinov3ForUniversalSegmentation(config).eval()
    else:
        config = transformers.EomtConfig(**sizes, use_swiglu_ffn=args.swiglu)
        model = transformers.EomtForUniversalSegmentation(config).eval()
    generator = torch.Generator().manual_seed(args.seed)
    shape_weights(model, generator)
    probabilities = [float(value) for value in args.attn_mask_probs.split(",")]
    model.attn_mask_probs.copy_(torch.tensor(probabilities))
    model.save_pretrained(args.out_dir, safe_serialization=not args.torch_bin)


def command_run(args):
    import transformers

    model = transformers.AutoModelForUniversalSegmentation.from_pretrained(args.model_dir).eval()
    with np.load(args.pixels) as data:
        pixel_values = torch.from_numpy(np.ascontiguousarray(data["pixel_values"]))
    with torch.no_grad():
        output = model(pixel_values=pixel_values)
    result = dict(
        class_queries_logits=output.class_queries_logits.numpy(),
        masks_queries_logits=output.masks_queries_logits.numpy(),
        attn_mask_probs=model.attn_mask_probs.numpy(),
        meta_json=np.array(json.dumps(dict(model_dir=str(args.model_dir), transformers=transformers.__version__,
                                           torch=torch.__version__,
                                           model=type(model).__name__,
                                           attention=model.config._attn_implementation))),
    )
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.result, **result)


def command_preprocess(args):
    from PIL import Image
    from transformers import EomtImageProcessor

    processor = EomtImageProcessor(size={"shortest_edge": args.size, "longest_edge": args.size}, do_pad=True)
    result = {}
    for index, path in enumerate(args.images):
        image = Image.open(path).convert("RGB")
        result[f"pixel_values_{index}"] = processor(images=image, return_tensors="pt")["pixel_values"][0].numpy()
    np.savez(args.result, **result)


def command_windows(args):
    from PIL import Image
    from transformers import AutoModelForUniversalSegmentation, EomtImageProcessor

    model = AutoModelForUniversalSegmentation.from_pretrained(args.model_dir).eval()
    size = model.config.image_size
    processor = EomtImageProcessor(size={"shortest_edge": size, "longest_edge": None}, do_split_image=True)
    result = {}
    for index, path in enumerate(args.images):
        image = Image.open(path).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            output = model(pixel_values=inputs["pixel_values"], patch_offsets=inputs["patch_offsets"])
        scores = processor.post_process_semantic_segmentation(
            output, target_sizes=[(image.height, image.width)], return_segmentation_scores=True)[0]
        result[f"pixel_values_{index}"] = inputs["pixel_values"].numpy()
        result[f"patch_offsets_{index}"] = torch.stack(inputs["patch_offsets"]).numpy()
        result[f"class_queries_logits_{index}"] = output.class_queries_logits.numpy()
        result[f"masks_queries_logits_{index}"] = output.masks_queries_logits.numpy()
        result[f"segmentation_scores_{index}"] = scores.segmentation_scores.numpy()
        result[f"segmentation_{index}"] = scores.segmentation.numpy()
    np.savez(args.result, **result)


def command_loss(args):
    from transformers import AutoModelForUniversalSegmentation

    data = np.load(args.inputs)
    draws = [torch.from_numpy(data[f"draw_{index}"]) for index in range(int(data["num_draws"]))]
    real_rand = torch.rand

    def injected_rand(*size, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        if len(size) != 3 or size[-1] != 2:  # not point coordinates: the masked-attention coin flips
            return real_rand(*size, **kwargs)
        if not draws:
            raise AssertionError(f"transformers drew more random points than given (shape {size})")
        draw = draws.pop(0)
        if tuple(draw.shape) != tuple(size):
            raise AssertionError(f"transformers asked torch.rand{tuple(size)}; next given draw is {tuple(draw.shape)}")
        return draw

    model = AutoModelForUniversalSegmentation.from_pretrained(args.model_dir).train()
    batch_size = int(data["batch_size"])
    torch.rand = injected_rand
    try:
        output = model(pixel_values=torch.from_numpy(data["pixel_values"]),
                       mask_labels=[torch.from_numpy(data[f"mask_labels_{b}"]) for b in range(batch_size)],
                       class_labels=[torch.from_numpy(data[f"class_labels_{b}"]) for b in range(batch_size)])
    finally:
        torch.rand = real_rand
    if draws:
        raise AssertionError(f"{len(draws)} given random tensors were not used")
    np.savez(args.result, loss=output.loss.detach().numpy())


def command_postprocess(args):
    from types import SimpleNamespace

    from transformers import EomtImageProcessor

    with np.load(args.logits) as data:
        outputs = SimpleNamespace(class_queries_logits=torch.from_numpy(data["class_queries_logits"]),
                                  masks_queries_logits=torch.from_numpy(data["masks_queries_logits"]))
        target_size = tuple(int(value) for value in data["target_size"])
    processor = EomtImageProcessor(size={"shortest_edge": args.size, "longest_edge": args.size}, do_pad=True)
    stuff_classes = list(range(args.num_things, outputs.class_queries_logits.shape[-1] - 1))
    panoptic = processor.post_process_panoptic_segmentation(
        outputs, target_sizes=[target_size], threshold=args.threshold, overlap_mask_area_threshold=args.overlap,
        stuff_classes=stuff_classes)[0]
    instance = processor.post_process_instance_segmentation(outputs, target_sizes=[target_size],
                                                            threshold=args.instance_threshold)[0]
    np.savez(args.result, panoptic_segmentation=panoptic["segmentation"].numpy(),
             panoptic_segments=np.array(json.dumps(panoptic["segments_info"])),
             instance_segmentation=instance["segmentation"].numpy(),
             instance_segments=np.array(json.dumps(instance["segments_info"])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="write a random-weight HF EoMT folder")
    make.add_argument("--hidden-size", type=int, default=64)
    make.add_argument("--layers", type=int, default=4)
    make.add_argument("--heads", type=int, default=4)
    make.add_argument("--image-size", type=int, default=64)
    make.add_argument("--patch-size", type=int, default=16)
    make.add_argument("--registers", type=int, default=2)
    make.add_argument("--num-blocks", type=int, default=2, help="blocks the queries pass through")
    make.add_argument("--queries", type=int, default=12)
    make.add_argument("--labels", type=int, default=7)
    make.add_argument("--swiglu", action="store_true")
    make.add_argument("--dinov3", action="store_true", help="EoMT-DINOv3 (rotary embeddings)")
    make.add_argument("--attn-mask-probs", default="1,1", help="comma-separated, one per query block")
    make.add_argument("--torch-bin", action="store_true", help="write pytorch_model.bin instead of safetensors")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out-dir", required=True)
    make.set_defaults(func=command_make)
    run = commands.add_parser("run", help="run a model folder on pixel_values from an npz")
    run.add_argument("--model-dir", required=True)
    run.add_argument("--pixels", required=True)
    run.add_argument("--result", required=True)
    run.set_defaults(func=command_run)
    preprocess = commands.add_parser("preprocess", help="EomtImageProcessor's pixel_values for images")
    preprocess.add_argument("--images", nargs="+", required=True)
    preprocess.add_argument("--size", type=int, default=640)
    preprocess.add_argument("--result", required=True)
    preprocess.set_defaults(func=command_preprocess)
    windows = commands.add_parser("windows", help="split-image semantic inference of a model folder on images")
    windows.add_argument("--model-dir", required=True)
    windows.add_argument("--images", nargs="+", required=True)
    windows.add_argument("--result", required=True)
    windows.set_defaults(func=command_windows)
    loss = commands.add_parser("loss", help="the training loss of a model folder with given random points")
    loss.add_argument("--model-dir", required=True)
    loss.add_argument("--inputs", required=True)
    loss.add_argument("--result", required=True)
    loss.set_defaults(func=command_loss)
    postprocess = commands.add_parser("postprocess", help="panoptic / instance post-processing of given logits")
    postprocess.add_argument("--logits", required=True)
    postprocess.add_argument("--size", type=int, required=True, help="the square input the logits came from")
    postprocess.add_argument("--num-things", type=int, required=True)
    postprocess.add_argument("--threshold", type=float, default=0.8)
    postprocess.add_argument("--overlap", type=float, default=0.8)
    postprocess.add_argument("--instance-threshold", type=float, default=0.5)
    postprocess.add_argument("--result", required=True)
    postprocess.set_defaults(func=command_postprocess)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
