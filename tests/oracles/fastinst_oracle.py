"""Reference ("oracle") outputs of ModelScope's own FastInst and its built-in ``fast-instance-segmentation`` pipeline.

Runs inside the oracle venv (``.venv-oracle``; ModelScope's FastInst imports once mmcv's extension loader is
stubbed, see ``mmcv_shim``; FastInst itself uses no mmcv op). It

1. builds ``modelscope.models.cv.image_instance_segmentation.fastinst_model.FastInst`` from a hub-style
   ``configuration.json`` ``model`` section (ResNet depth and decoder layers from the options);
2. gives it seeded random weights shaped so that the outputs are not degenerate (``shape_weights``);
3. writes the hub layout into ``--model-dir`` (configuration.json + pytorch_model.pt holding {"model": state_dict});
4. runs ModelScope's pipeline on that directory for each ``--images`` path with ``score_thr=0`` and stores the
   outputs plus the backbone input and raw head outputs (captured by hooks) in one ``.npz``.

NPZ schema (``i`` = index of the image in ``--images``)::

    classes                 str [K]
    {i}_masks               uint8 [N, H, W]  pipeline masks in pipeline order
    {i}_labels              str [N]          pipeline labels
    {i}_scores              float64 [N]      pipeline scores
    {i}_input               float32 [1, 3, Hp, Wp]  normalised, padded backbone input
    {i}_cls_logits          float32 [Q, K + 1]      last layer's class logits
    {i}_mask_logits         float32 [Q, Hp/8, Wp/8] last layer's mask logits
    {i}_proposal_logits     float32 [K + 1, Hp/16, Wp/16] auxiliary class head of the query selection
    {i}_*_logits64          float64      the three above from the same network run in float64 on the same input

With ``--keys-only`` it writes only ``{state-dict key: shape}`` of the network (JSON) to ``--result``.

Example::

    .venv-oracle/bin/python tests/oracles/fastinst_oracle.py --model-dir /tmp/fastinst --images a.jpg \
        --result /tmp/fastinst.npz
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mmcv_shim  # noqa: E402

mmcv_shim.install()

import numpy as np  # noqa: E402
import torch  # noqa: E402

COCO_THING_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant",
    "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--images", nargs="*", default=[])
    parser.add_argument("--result", required=True)
    parser.add_argument("--keys-only", action="store_true",
                        help="only write {key: shape} of the network's state dict to --result (JSON); no weights, no pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--dec-layers", type=int, default=3)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--num-aux-queries", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--dim-feedforward", type=int, default=1024)
    parser.add_argument("--class-logit-std", type=float, default=3.0, help="spread of the final class logits")
    parser.add_argument("--proposal-logit-std", type=float, default=1.0, help="spread of the auxiliary class logits (per unit feature)")
    parser.add_argument("--mask-logit-std", type=float, default=4.0, help="spread of the mask logits")
    parser.add_argument("--mask-offset", type=float, default=1.0, help="negative offset (in stds) that makes masks sparse")
    return parser.parse_args(argv)


def model_section(args):
    """``configuration.json`` ``model``: ModelScope's FastInst constructor arguments (the hub card's values)."""
    return {
        "type": "fastinst", "pretrained": True, "classes": COCO_THING_CLASSES,
        "backbone": {"out_features": ["res3", "res4", "res5"], "depth": args.depth, "num_groups": 1, "width_per_group": 64,
                     "norm": "BN", "stem_out_channels": 64, "res2_out_channels": 256, "stride_in_1x1": False,
                     "res4_dilation": 1, "res5_dilation": 1, "res5_multi_grid": [1, 1, 1]},
        "encoder": {"in_features": ["res3", "res4", "res5"], "convs_dim": args.hidden_dim, "mask_dim": args.hidden_dim, "norm": "GN"},
        "decoder": {"num_classes": len(COCO_THING_CLASSES), "hidden_dim": args.hidden_dim, "num_queries": args.num_queries,
                    "num_aux_queries": args.num_aux_queries, "nheads": 8, "dim_feedforward": args.dim_feedforward,
                    "dec_layers": args.dec_layers, "pre_norm": False, "mask_dim": args.hidden_dim},
    }


def calibration_input(seed: int, height: int = 480, width: int = 640) -> torch.Tensor:
    """A smooth random image (normalised scale) to measure activations on while shaping the heads."""
    generator = torch.Generator().manual_seed(seed + 1)
    coarse = torch.randn(1, 3, height // 32, width // 32, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def shape_weights(model, args) -> None:
    """Non-degenerate random outputs: batch-norm statistics that keep the backbone's activations alive, a defined
    meta position map, spread class logits (distinct, confident queries) and sparse masks (a constant mask-feature
    channel whose coefficient is a negative offset), at every decoder stage so attention masks are informative too."""
    generator = torch.Generator().manual_seed(args.seed)
    decoder = model.sem_seg_head.predictor
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
        decoder.meta_pos_embed.copy_(torch.randn(decoder.meta_pos_embed.shape, generator=generator))
        # He-initialised head MLPs without biases, so the query-specific signal (not the biases) reaches the last layer
        for layers in (decoder.class_embed_layers, decoder.mask_embed_layers):
            for mlp in layers:
                for linear in mlp.layers:
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * (2.0 / linear.weight.shape[1]) ** 0.5)
                    linear.bias.zero_()
        # a confident auxiliary class head, so the query selection is not decided by rounding-level differences
        proposal_head = decoder.query_proposal.conv_proposal_cls_logits
        proposal_head[0].weight.copy_(torch.randn(proposal_head[0].weight.shape, generator=generator) * (2.0 / proposal_head[0].weight[0].numel()) ** 0.5)
        proposal_head[2].weight.copy_(torch.randn(proposal_head[2].weight.shape, generator=generator) * args.proposal_logit_std / proposal_head[2].weight.shape[1] ** 0.5)
        for linear in decoder.mask_features_layers:
            linear.weight[-1] = 0
            linear.bias[-1] = 1.0

        # measure on a calibration image: centre each class head on its mean input (so classes differ between
        # queries rather than sharing one favourite), scale the logits, then scale and offset the mask logits
        images = calibration_input(args.seed)
        captured = {}
        hooks = [mlp.layers[-1].register_forward_pre_hook(
            lambda module, inputs, stage=stage: captured.__setitem__(("class", stage), inputs[0].detach()))
            for stage, mlp in enumerate(decoder.class_embed_layers)]
        hooks += [linear.register_forward_pre_hook(
            lambda module, inputs, stage=stage: captured.__setitem__(("pixel", stage), inputs[0].detach()))
            for stage, linear in enumerate(decoder.mask_features_layers)]
        model.sem_seg_head(model.backbone(images))  # ModelScope predicts classes at the last stage only
        for hook in hooks:
            hook.remove()
        for stage, linear in enumerate(decoder.mask_features_layers):
            # zero-mean mask features over the pixels, so masks vary in space rather than per query
            centred_bias = -linear.weight @ captured[("pixel", stage)].flatten(0, -2).mean(0)
            linear.bias[:-1] = centred_bias[:-1]
        for stage in range(len(decoder.class_embed_layers)):
            if ("class", stage) not in captured:
                continue
            hidden = captured[("class", stage)]
            last = decoder.class_embed_layers[stage].layers[-1]
            last.bias.copy_(-last.weight @ hidden.flatten(0, -2).mean(0))
            logits = hidden @ last.weight.T + last.bias
            scale = args.class_logit_std / float(logits.std().clamp_min(1e-6))
            last.weight.mul_(scale)
            last.bias.mul_(scale)
        for mlp in decoder.mask_embed_layers:
            mlp.layers[-1].weight[-1] = 0
            mlp.layers[-1].bias[-1] = 0
        outputs = model.sem_seg_head(model.backbone(images))
        stage_masks = [stage_output["pred_masks"] for stage_output in outputs["aux_outputs"]] + [outputs["pred_masks"]]
        for stage, (mlp, mask_logits) in enumerate(zip(decoder.mask_embed_layers, stage_masks)):
            last = mlp.layers[-1]
            scale = args.mask_logit_std / float(mask_logits.std().clamp_min(1e-6))
            last.weight.mul_(scale)
            last.bias.mul_(scale)
            # the constant feature channel (bias 1) carries the offset: sparse output masks at the last stage; the
            # earlier stages only make attention masks, kept about half full so a pixel whose logit sits within
            # rounding of 0 changes a query's attention little
            last.weight[-1] = 0
            last.bias[-1] = -args.mask_offset * args.mask_logit_std if stage == len(stage_masks) - 1 else 0.0


def write_model_dir(args):
    from modelscope.models.cv.image_instance_segmentation.fastinst_model import FastInst

    torch.manual_seed(args.seed)
    section = model_section(args)
    constructor = {key: json.loads(json.dumps(value)) for key, value in section.items() if key != "type"}
    constructor["pretrained"] = False
    model = FastInst(args.model_dir, **constructor).eval()
    shape_weights(model, args)
    os.makedirs(args.model_dir, exist_ok=True)
    torch.save({"model": model.state_dict()}, os.path.join(args.model_dir, "pytorch_model.pt"))
    with open(os.path.join(args.model_dir, "configuration.json"), "w") as handle:
        json.dump({"framework": "pytorch", "task": "image-segmentation", "model": section,
                   "pipeline": {"type": "fast-instance-segmentation"}}, handle, indent=2)


def run_pipeline(args):
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks

    segmenter = pipeline(Tasks.image_segmentation, model=args.model_dir, device="cpu")
    model = segmenter.model
    captured = {}
    model.backbone.register_forward_pre_hook(lambda module, inputs: captured.__setitem__("input", inputs[0].detach().clone()))
    model.sem_seg_head.register_forward_hook(lambda module, inputs, output: captured.__setitem__("head", {
        "cls_logits": output["pred_logits"][0].detach().clone(), "mask_logits": output["pred_masks"][0].detach().clone(),
        "proposal_logits": output["proposal_cls_logits"][0].detach().clone()}))
    arrays = {"classes": np.array(model.classes)}
    for index, image in enumerate(args.images):
        result = segmenter(image, score_thr=0)
        masks = result["masks"]
        arrays[f"{index}_masks"] = np.stack([np.asarray(mask, dtype=np.uint8) for mask in masks]) if masks else np.zeros((0, 1, 1), np.uint8)
        arrays[f"{index}_labels"] = np.array(result["labels"])
        arrays[f"{index}_scores"] = np.asarray(result["scores"], dtype=np.float64)
        arrays[f"{index}_input"] = captured["input"].numpy()
        for name, value in captured["head"].items():
            arrays[f"{index}_{name}"] = value.numpy()
    # the same network in float64 on the same inputs: logits free of float32 rounding (and of the attention-mask
    # flips it causes where a mask logit lies within rounding of 0)
    model.double()
    with torch.no_grad():
        for index in range(len(args.images)):
            output = model.sem_seg_head(model.backbone(torch.from_numpy(arrays[f"{index}_input"]).double()))
            arrays[f"{index}_cls_logits64"] = output["pred_logits"][0].numpy()
            arrays[f"{index}_mask_logits64"] = output["pred_masks"][0].numpy()
            arrays[f"{index}_proposal_logits64"] = output["proposal_cls_logits"][0].numpy()
    np.savez_compressed(args.result, **arrays)


def write_key_shapes(args):
    from modelscope.models.cv.image_instance_segmentation.fastinst_model import FastInst

    section = model_section(args)
    constructor = {key: value for key, value in section.items() if key != "type"}
    constructor["pretrained"] = False
    model = FastInst(args.model_dir, **constructor)
    with open(args.result, "w") as handle:
        json.dump({key: list(value.shape) for key, value in model.state_dict().items()}, handle)


def main(argv=None):
    args = parse_args(argv)
    if args.keys_only:
        write_key_shapes(args)
        return
    write_model_dir(args)
    run_pipeline(args)


if __name__ == "__main__":
    main()
