"""Reference ("oracle") outputs of Hugging Face transformers' OneFormerForUniversalSegmentation with random weights.

Runs inside the oracle venv (``.venv-oracle``: transformers 5 and open_clip on the runtime venv's torch).
Subcommands:

``make``    builds a small ``OneFormerForUniversalSegmentation`` with a Swin or a DiNAT backbone (sizes from the
            options), gives it seeded random weights shaped so that its outputs on ``--calibration-pixels`` are not
            degenerate (see ``shape_weights``) and writes it with ``save_pretrained`` (config.json +
            model.safetensors, or pytorch_model.bin with ``--torch-bin``); with ``--result``, then runs the written
            folder on the calibration pixels as ``run`` does.
``run``     loads such a folder and stores, for ``pixel_values`` float32 [B,3,H,W] in an ``.npz`` and each task,
            ``class_<task>`` [B,Q,K+1], ``masks_<task>`` [B,Q,H/4,W/4] and the ``task_inputs_<task>`` [task_seq_len]
            that OneFormerProcessor made from "the task is <task>" with a real CLIP tokenizer (``clip_tokenizer``).
``tokens``  the task inputs of OneFormerProcessor (CLIPTokenizer) and of open_clip's own CLIP tokenizer.
``texts``   open_clip's CLIP token ids of the texts in a json list, at ``--context-length``.
``preprocess``  OneFormerImageProcessor's ``pixel_values`` [3,H,W] of each image (one image per call: no batch
            padding).
``postprocess`` OneFormerProcessor's post-processing of stored logits for one task at a target size.

DiNAT needs NATTEN's compiled ``natten2dqkrpb`` / ``natten2dav``, which no wheel here provides: ``patch_dinat``
puts the loop reference of ``natten_reference.py`` in their place. It also restores the attention layout of
transformers 4.40 (``transpose_for_scores``: (B, H, W, heads, d) -> (B, heads, H, W, d)): transformers 5's
``NeighborhoodAttention.forward`` views the (B, H, W, C) map as (B, W, H, heads, d), which no NATTEN accepts.
"""
import argparse
import gzip
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

TASKS = ("panoptic", "semantic", "instance")


# ------------------------------------------------------------------------------------------------
# DiNAT without NATTEN
# ------------------------------------------------------------------------------------------------
def patch_dinat():
    import natten_reference
    from transformers.models.dinat import modeling_dinat

    def forward(self, hidden_states, output_attentions=False):
        def transpose_for_scores(features):
            # (B, H, W, C) -> (B, heads, H, W, head_dim)
            shape = features.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
            return features.view(shape).permute(0, 3, 1, 2, 4)

        query_layer = transpose_for_scores(self.query(hidden_states)) / math.sqrt(self.attention_head_size)
        key_layer = transpose_for_scores(self.key(hidden_states))
        value_layer = transpose_for_scores(self.value(hidden_states))
        scores = modeling_dinat.natten2dqkrpb(query_layer, key_layer, self.rpb, self.kernel_size, self.dilation)
        probabilities = self.dropout(nn.functional.softmax(scores, dim=-1))
        context = modeling_dinat.natten2dav(probabilities, value_layer, self.kernel_size, self.dilation)
        context = context.permute(0, 2, 3, 1, 4).contiguous()
        context = context.view(context.size()[:-2] + (self.all_head_size,))
        return (context, probabilities) if output_attentions else (context,)

    modeling_dinat.natten2dqkrpb = natten_reference.natten2dqkrpb
    modeling_dinat.natten2dav = natten_reference.natten2dav
    modeling_dinat.requires_backends = lambda *args, **kwargs: None
    modeling_dinat.NeighborhoodAttention.forward = forward


# ------------------------------------------------------------------------------------------------
# tokenizers
# ------------------------------------------------------------------------------------------------
def clip_tokenizer():
    """transformers' CLIPTokenizer over CLIP's own vocabulary (``bpe_simple_vocab_16e6``, shipped by open_clip),
    written as vocab.json + merges.txt the way CLIP's SimpleTokenizer builds its table."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocabulary = list(bytes_to_unicode().values())
    vocabulary = vocabulary + [token + "</w>" for token in vocabulary]
    vocabulary += ["".join(merge.split()) for merge in merges]
    vocabulary += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp())
    (folder / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocabulary)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder))


def processor_task_inputs(task_seq_len):
    """{task: OneFormerProcessor's task_inputs (its own __call__ on a small image)}."""
    from transformers import OneFormerImageProcessor, OneFormerProcessor

    processor = OneFormerProcessor(image_processor=OneFormerImageProcessor(), tokenizer=clip_tokenizer(),
                                   task_seq_length=task_seq_len)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    return {task: processor(images=image, task_inputs=[task], return_tensors="pt")["task_inputs"][0]
            for task in TASKS}


# ------------------------------------------------------------------------------------------------
# make
# ------------------------------------------------------------------------------------------------
def _normal(shape, generator, std=1.0):
    return torch.randn(shape, generator=generator, dtype=torch.float32) * std


@torch.no_grad()
def shape_weights(model, generator, calibration_pixels):
    """Moves HF's init away from values that would hide mistakes, and makes the outputs non-degenerate:

    - every LayerNorm / GroupNorm gets weight 1 + N(0, 0.1), bias N(0, 0.1); all-zero biases N(0, 0.02);
    - backbone linear layers LeCun-normal, the relative position biases N(0, 0.5) (HF: std 0.02 and zeros, which
      make attention uniform and hide indexing errors), DiNAT's layer scales N(0.5, 0.2) per channel;
    - deformable attention: query-dependent sampling offsets and attention weights (HF: zeros);
    - attention in-projections xavier with gain 3 (HF: N(0, 0.02), uniform attention), decoder residual branches
      x0.3 so the post-norm layers refine the queries instead of replacing them, query positions x3;
    - class and mask heads calibrated so that queries disagree on classes and masks are partial
      (``calibrate_heads``).
    """
    for module in model.modules():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.weight.copy_(1.0 + _normal(module.weight.shape, generator, 0.1))
            module.bias.copy_(_normal(module.bias.shape, generator, 0.1))
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            if torch.count_nonzero(module.bias) == 0:
                module.bias.copy_(_normal(module.bias.shape, generator, 0.02))
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.xavier_uniform_(module.in_proj_weight, gain=3.0)
            module.in_proj_bias.copy_(_normal(module.in_proj_bias.shape, generator, 0.02))
    backbone = model.model.pixel_level_module.encoder
    for name, parameter in backbone.named_parameters():
        if name.endswith("relative_position_bias_table") or name.endswith(".rpb"):
            parameter.copy_(_normal(parameter.shape, generator, 0.5))
        if name.endswith("layer_scale_parameters"):
            parameter.copy_(0.5 + _normal(parameter.shape, generator, 0.2))
    for module in backbone.modules():
        if isinstance(module, nn.Linear):
            module.weight.copy_(_normal(module.weight.shape, generator, module.in_features ** -0.5))
    for layer in model.model.pixel_level_module.decoder.encoder.layers:
        attention = layer.self_attn
        fan_in = attention.sampling_offsets.in_features
        attention.sampling_offsets.weight.copy_(
            _normal(attention.sampling_offsets.weight.shape, generator, 0.5 / fan_in ** 0.5))
        attention.sampling_offsets.bias.add_(_normal(attention.sampling_offsets.bias.shape, generator, 0.2))
        attention.attention_weights.weight.copy_(
            _normal(attention.attention_weights.weight.shape, generator, 1.0 / fan_in ** 0.5))
        attention.attention_weights.bias.copy_(_normal(attention.attention_weights.bias.shape, generator, 0.3))
    decoder = model.model.transformer_module.decoder
    for layer in decoder.layers:
        for linear in (layer.self_attn.self_attn.out_proj, layer.cross_attn.multihead_attn.out_proj,
                       layer.ffn.linear2):
            linear.weight.mul_(0.3)
            linear.bias.mul_(0.3)
    # distinct query positions: the object queries all start as the task query and differ only through them
    model.model.transformer_module.queries_embedder.weight.mul_(3.0)
    calibrate_heads(model, generator, calibration_pixels)


@torch.no_grad()
def calibrate_heads(model, generator, pixels, rounds=3):
    """On the calibration pixels (panoptic task): the object queries share a large common part that would give every
    query the same class and mask.

    - masks: channel 0 of the mask features becomes the constant 1, and the mask embedding's output on it (a linear
      function of its penultimate activations, fitted by least squares) gives each query the offset at which a
      random 30-40% of its mask logits are positive (refitted ``rounds`` times: the masks steer the decoder);
    - classes: the class head reads the queries' top 4 principal directions around their mean, whitened, through
      random weights: class logits vary by about 4 across queries, in several directions.
    """
    tokens = processor_task_inputs(model.config.task_seq_len)["panoptic"][None]
    decoder = model.model.transformer_module.decoder
    projection = model.model.pixel_level_module.decoder.mask_projection
    projection.weight[0] = 0.0
    projection.bias[0] = 1.0
    last_mask_layer = decoder.mask_embed.layers[-1].layers[0]
    num_queries = model.config.num_queries
    coverage = 0.3 + 0.1 * torch.rand(num_queries, generator=generator)

    def run():
        captured = {}
        hooks = [last_mask_layer.register_forward_hook(lambda m, inputs, output: captured.update(hidden=inputs[0])),
                 decoder.decoder_norm.register_forward_hook(lambda m, inputs, output: captured.update(normed=output))]
        output = model(pixel_values=pixels, task_inputs=tokens)
        for hook in hooks:
            hook.remove()
        # the last calls are the final prediction's: hidden (B, Q, C), normed (Q, B, C)
        return output, captured["hidden"][0], captured["normed"][:, 0]

    for _ in range(rounds):
        output, hidden, _ = run()
        offsets = hidden @ last_mask_layer.weight[0] + last_mask_layer.bias[0]
        # (Q, h*w) logits without the constant channel's offset
        base = output.masks_queries_logits[0].flatten(1) - offsets[:, None]
        target = -torch.stack([torch.quantile(base[index], 1.0 - coverage[index]) for index in range(num_queries)])
        design = torch.cat([hidden, torch.ones(num_queries, 1)], dim=1)
        solution = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
        last_mask_layer.weight[0] = solution[:-1]
        last_mask_layer.bias[0] = solution[-1]
    _, _, queries = run()
    centred = queries - queries.mean(0)
    _, singular_values, directions = torch.linalg.svd(centred, full_matrices=False)
    rank = min(4, num_queries - 1)
    # (rank, C): whitened principal directions
    whitening = directions[:rank] / singular_values[:rank, None] * num_queries ** 0.5
    mixing = _normal((decoder.class_embed.out_features, rank), generator, 4.0 / rank ** 0.5)
    decoder.class_embed.weight.copy_(mixing @ whitening)
    decoder.class_embed.bias.copy_(-(mixing @ whitening) @ queries.mean(0))


def command_make(args):
    import transformers

    if args.backbone == "dinat":
        patch_dinat()
    stages = ["stage1", "stage2", "stage3", "stage4"]
    depths = [int(value) for value in args.depths.split(",")]
    heads = [int(value) for value in args.backbone_heads.split(",")]
    if args.backbone == "swin":
        backbone_config = transformers.SwinConfig(
            embed_dim=args.embed_dim, depths=depths, num_heads=heads, window_size=args.window_size,
            drop_path_rate=0.0, out_features=stages)
    else:
        dilations = [[int(value) for value in stage.split(",")] for stage in args.dilations.split(";")]
        backbone_config = transformers.DinatConfig(
            embed_dim=args.embed_dim, depths=depths, num_heads=heads, kernel_size=args.kernel_size,
            dilations=dilations, mlp_ratio=args.mlp_ratio, drop_path_rate=0.0,
            layer_scale_init_value=args.layer_scale, out_features=stages)
    id2label = {index: f"class_{index}" for index in range(args.labels)}
    config = transformers.OneFormerConfig(
        backbone_config=backbone_config, num_queries=args.queries, conv_dim=args.hidden, mask_dim=args.hidden,
        hidden_dim=args.hidden, encoder_feedforward_dim=args.feedforward, dim_feedforward=args.feedforward,
        encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers + 1,
        num_attention_heads=args.heads, query_dec_layers=args.query_layers, task_seq_len=args.task_seq_len,
        text_encoder_context_length=args.task_seq_len, use_task_norm=not args.no_task_norm,
        id2label=id2label, label2id={name: index for index, name in id2label.items()},
        # a training checkpoint (text mapper included): its width is the decoder's, its prompts ``--text-context``
        **({"is_training": True, "text_encoder_width": args.hidden, "text_encoder_num_layers": 2,
            "text_encoder_n_ctx": args.text_context} if args.training else {}))
    torch.manual_seed(args.seed)
    model = transformers.OneFormerForUniversalSegmentation(config).eval()
    with np.load(args.calibration_pixels) as data:
        calibration = torch.from_numpy(np.ascontiguousarray(data["pixel_values"]))
    # shaped as an inference model (no text inputs, no training-time dropout), then saved as configured
    flagged = [module for module in model.modules() if getattr(module, "is_training", False)]
    for module in flagged:
        module.is_training = False
    shape_weights(model, torch.Generator().manual_seed(args.seed + 1), calibration)
    for module in flagged:
        module.is_training = True
    model.save_pretrained(args.out_dir, safe_serialization=not args.torch_bin)
    if args.result:
        run_model_dir(args.out_dir, args.calibration_pixels, TASKS, args.result)


# ------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------
def command_run(args):
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    if config["backbone_config"]["model_type"] == "dinat":
        patch_dinat()
    run_model_dir(args.model_dir, args.pixels, args.tasks, args.result)


def run_model_dir(model_dir, pixels_path, tasks, result_path):
    """Loads ``model_dir`` with ``from_pretrained`` and stores its logits for each task (see ``run``)."""
    import transformers

    model = transformers.OneFormerForUniversalSegmentation.from_pretrained(model_dir).eval()
    with np.load(pixels_path) as data:
        pixel_values = torch.from_numpy(np.ascontiguousarray(data["pixel_values"]))
    task_inputs = processor_task_inputs(model.config.task_seq_len)
    result = {}
    for task in tasks:
        tokens = task_inputs[task][None].expand(pixel_values.shape[0], -1)
        with torch.no_grad():
            output = model(pixel_values=pixel_values, task_inputs=tokens)
        result[f"class_{task}"] = output.class_queries_logits.numpy()
        result[f"masks_{task}"] = output.masks_queries_logits.numpy()
        result[f"task_inputs_{task}"] = task_inputs[task].numpy()
    result["meta_json"] = np.array(json.dumps(dict(transformers=transformers.__version__, torch=torch.__version__)))
    np.savez(result_path, **result)


def command_tokens(args):
    from open_clip.tokenizer import SimpleTokenizer

    task_inputs = processor_task_inputs(args.task_seq_len)
    simple = SimpleTokenizer()
    result = {}
    for task in TASKS:
        result[f"processor_{task}"] = task_inputs[task].numpy()
        result[f"open_clip_{task}"] = simple([f"the task is {task}"], context_length=args.task_seq_len)[0].numpy()
    np.savez(args.result, **result)


def command_texts(args):
    from open_clip.tokenizer import SimpleTokenizer

    texts = json.loads(Path(args.texts).read_text())
    np.savez(args.result, open_clip=SimpleTokenizer()(texts, context_length=args.context_length).numpy())


def command_preprocess(args):
    from PIL import Image
    from transformers import OneFormerImageProcessor

    processor = OneFormerImageProcessor(size={"shortest_edge": args.short_side, "longest_edge": args.long_side})
    result = {}
    for index, path in enumerate(args.images):
        image = Image.open(path).convert("RGB")
        encoded = processor(images=image, task_inputs=["panoptic"], return_tensors="pt")
        result[f"pixel_values_{index}"] = encoded["pixel_values"][0].numpy()
    np.savez(args.result, **result)


def command_postprocess(args):
    from transformers import OneFormerImageProcessor
    from transformers.models.oneformer.modeling_oneformer import OneFormerForUniversalSegmentationOutput

    with np.load(args.logits) as data:
        output = OneFormerForUniversalSegmentationOutput(
            class_queries_logits=torch.from_numpy(data["class_queries_logits"]),
            masks_queries_logits=torch.from_numpy(data["masks_queries_logits"]))
    processor = OneFormerImageProcessor()
    target_sizes = [tuple(args.target_size)]
    result = {}
    if args.task == "semantic":
        result["semantic"] = processor.post_process_semantic_segmentation(output, target_sizes=target_sizes)[0].numpy()
    else:
        post_process = (processor.post_process_panoptic_segmentation if args.task == "panoptic"
                        else processor.post_process_instance_segmentation)
        options = dict(threshold=args.threshold, overlap_mask_area_threshold=args.overlap, target_sizes=target_sizes)
        if args.task == "panoptic":
            options["label_ids_to_fuse"] = set(args.fuse)
        segmented = post_process(output, **options)[0]
        result["segmentation"] = segmented["segmentation"].numpy()
        result["segments_json"] = np.array(json.dumps(segmented["segments_info"]))
    np.savez(args.result, **result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="write a random-weight HF OneFormer folder")
    make.add_argument("--backbone", choices=("swin", "dinat"), default="swin")
    make.add_argument("--embed-dim", type=int, default=32)
    make.add_argument("--depths", default="2,2,2,2")
    make.add_argument("--backbone-heads", default="1,2,4,8")
    make.add_argument("--window-size", type=int, default=7, help="Swin")
    make.add_argument("--kernel-size", type=int, default=3, help="DiNAT")
    make.add_argument("--dilations", default="1,2;1,2;1,1;1,1", help="DiNAT: per stage, ';' between stages")
    make.add_argument("--mlp-ratio", type=float, default=2.0, help="DiNAT")
    make.add_argument("--layer-scale", type=float, default=0.0, help="DiNAT layer_scale_init_value")
    make.add_argument("--hidden", type=int, default=64)
    make.add_argument("--heads", type=int, default=4)
    make.add_argument("--feedforward", type=int, default=128)
    make.add_argument("--encoder-layers", type=int, default=2)
    make.add_argument("--decoder-layers", type=int, default=3, help="masked-attention layers (HF gets one more)")
    make.add_argument("--query-layers", type=int, default=2)
    make.add_argument("--queries", type=int, default=12)
    make.add_argument("--labels", type=int, default=7)
    make.add_argument("--task-seq-len", type=int, default=77)
    make.add_argument("--no-task-norm", action="store_true")
    make.add_argument("--training", action="store_true", help="is_training=True: the text mapper is saved too")
    make.add_argument("--text-context", type=int, default=4, help="text_encoder_n_ctx with --training")
    make.add_argument("--torch-bin", action="store_true", help="write pytorch_model.bin instead of safetensors")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--calibration-pixels", required=True,
                      help="npz with pixel_values [1,3,H,W] the heads are calibrated on (see calibrate_heads)")
    make.add_argument("--out-dir", required=True)
    make.add_argument("--result", help="also run the written folder on the calibration pixels (as ``run``)")
    make.set_defaults(func=command_make)
    run = commands.add_parser("run", help="run a model folder on pixel_values from an npz, for each task")
    run.add_argument("--model-dir", required=True)
    run.add_argument("--pixels", required=True)
    run.add_argument("--tasks", nargs="+", default=list(TASKS))
    run.add_argument("--result", required=True)
    run.set_defaults(func=command_run)
    tokens = commands.add_parser("tokens", help="task inputs of OneFormerProcessor and of open_clip")
    tokens.add_argument("--task-seq-len", type=int, default=77)
    tokens.add_argument("--result", required=True)
    tokens.set_defaults(func=command_tokens)
    texts = commands.add_parser("texts", help="open_clip's CLIP token ids of the texts in a json list")
    texts.add_argument("--texts", required=True)
    texts.add_argument("--context-length", type=int, default=77)
    texts.add_argument("--result", required=True)
    texts.set_defaults(func=command_texts)
    preprocess = commands.add_parser("preprocess", help="OneFormerImageProcessor's pixel_values for images")
    preprocess.add_argument("--images", nargs="+", required=True)
    preprocess.add_argument("--short-side", type=int, default=800)
    preprocess.add_argument("--long-side", type=int, default=1333)
    preprocess.add_argument("--result", required=True)
    preprocess.set_defaults(func=command_preprocess)
    postprocess = commands.add_parser("postprocess", help="OneFormer post-processing of stored logits")
    postprocess.add_argument("--logits", required=True)
    postprocess.add_argument("--task", choices=TASKS, required=True)
    postprocess.add_argument("--target-size", type=int, nargs=2, required=True)
    postprocess.add_argument("--threshold", type=float, default=0.8)
    postprocess.add_argument("--overlap", type=float, default=0.8)
    postprocess.add_argument("--fuse", type=int, nargs="*", default=[])
    postprocess.add_argument("--result", required=True)
    postprocess.set_defaults(func=command_postprocess)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
