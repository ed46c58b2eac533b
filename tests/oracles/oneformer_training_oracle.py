"""Reference ("oracle") pieces of transformers' OneFormer training, for tests/test_oneformer_training.py.

Usage: oneformer_training_oracle.py COMMAND INPUT.npz RESULT.npz

``loss``         transformers' ``OneFormerLoss`` (its matcher included) on the logits, targets and contrastive
                 inputs of INPUT (the names of tests/oracles/criterion_oracle.py, plus ``contrastive_queries``
                 [B,Q,C], ``text_queries`` [B,T,C], ``contrastive_temperature``), ``torch.rand`` replaced call by
                 call by the given ``draw_{i}``. RESULT: unweighted ``loss_*`` (``loss_cross_entropy`` renamed
                 ``loss_ce``), the weighted total of ``OneFormerForUniversalSegmentation.get_loss_dict`` /
                 ``get_loss`` as ``total``, and the logit scale's gradient of the contrastive term as
                 ``logit_scale_grad``.
``text-mapper``  a seeded random ``OneFormerTextMapper`` (sizes in INPUT) run on INPUT's ``tokens``
                 [B,num_text,L]; RESULT: ``text_queries`` and every state-dict tensor as ``weight/<name>``.
``model-loss``   a training folder (``oneformer_oracle.py make --training``) loaded with dropout 0, run by
                 ``OneFormerForUniversalSegmentation.forward`` on INPUT's ``pixel_values``, ``task_inputs``
                 [B,task_seq_len], ``text_inputs`` [B,num_text,L] and targets, ``torch.rand`` replaced by the given
                 draws (as ``loss``); RESULT: its weighted ``loss_*`` terms (``get_loss_dict``), ``total`` (its
                 ``loss``), ``contrastive_queries`` and ``text_queries``.
``targets``      ``OneFormerImageProcessor`` (class metadata from a class-info JSON written here from INPUT's
                 ``class_names`` and ``thing_ids``, ``num_text``) on one image's ``segment_map`` [H,W] with the
                 mapping ``segment_ids`` -> ``segment_classes`` (without ``segment_ids``: the map holds class
                 indices), ``ignore_index`` when given, once per task of ``tasks`` (default all three; one image per
                 call: the processor counts classes across a batch's images); RESULT: ``labels_<task>``,
                 ``masks_<task>``, ``texts_<task>``.
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.models.oneformer.modeling_oneformer import (
    OneFormerHungarianMatcher,
    OneFormerLoss,
    OneFormerTextMapper,
)


def injected_draws(data):
    """A stand-in for ``torch.rand`` returning INPUT's ``draw_{i}`` in order (checking each shape), and the list of
    draws not yet used."""
    draws = [torch.from_numpy(data[f"draw_{index}"]) for index in range(int(data["num_draws"]))]

    def injected_rand(*size, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        if not draws:
            raise AssertionError(f"transformers drew more random tensors than given (shape {size})")
        draw = draws.pop(0)
        if tuple(draw.shape) != tuple(size):
            raise AssertionError(f"transformers asked torch.rand{tuple(size)}; next given draw is {tuple(draw.shape)}")
        return draw.to(kwargs.get("device") or "cpu")

    return injected_rand, draws


def command_loss(data) -> dict:
    injected_rand, draws = injected_draws(data)
    real_rand = torch.rand
    config = transformers.OneFormerConfig(contrastive_temperature=float(data["contrastive_temperature"]))
    num_points = int(data["num_points"])
    matcher = OneFormerHungarianMatcher(cost_class=config.class_weight, cost_dice=config.dice_weight,
                                        cost_mask=config.mask_weight, num_points=num_points)
    weight_dict = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
                   "loss_dice": config.dice_weight, "loss_contrastive": config.contrastive_weight}
    loss = OneFormerLoss(num_classes=int(data["num_classes"]), matcher=matcher, weight_dict=weight_dict,
                         eos_coef=config.no_object_weight, num_points=num_points,
                         oversample_ratio=config.oversample_ratio,
                         importance_sample_ratio=config.importance_sample_ratio,
                         contrastive_temperature=config.contrastive_temperature)
    batch_size, num_stages = int(data["batch_size"]), int(data["num_stages"])
    mask_labels = [torch.from_numpy(data[f"target_masks_{b}"]) for b in range(batch_size)]
    class_labels = [torch.from_numpy(data[f"target_labels_{b}"]) for b in range(batch_size)]
    auxiliary = [{"class_queries_logits": torch.from_numpy(data[f"class_logits_{s}"]),
                  "masks_queries_logits": torch.from_numpy(data[f"mask_logits_{s}"])} for s in range(1, num_stages)]
    torch.rand = injected_rand
    try:
        losses = loss(masks_queries_logits=torch.from_numpy(data["mask_logits_0"]),
                      class_queries_logits=torch.from_numpy(data["class_logits_0"]),
                      contrastive_queries_logits=torch.from_numpy(data["contrastive_queries"]),
                      mask_labels=mask_labels, class_labels=class_labels,
                      text_queries=torch.from_numpy(data["text_queries"]), auxiliary_predictions=auxiliary,
                      calculate_contrastive_loss=True)
    finally:
        torch.rand = real_rand
    if draws:
        raise AssertionError(f"{len(draws)} given random tensors were not used")
    losses["loss_contrastive"].backward()
    # the mask terms come back with shape (1,) (transformers' mask count is a 1-element tensor)
    result = {name.replace("loss_cross_entropy", "loss_ce"): value.detach().reshape(()).numpy()
              for name, value in losses.items()}
    # OneFormerForUniversalSegmentation.get_loss_dict: each term times the weight whose name it contains
    weighted = {name: value.detach().clone() for name, value in losses.items()}
    for key, weight in weight_dict.items():
        for name in weighted:
            if key in name:
                weighted[name] = weighted[name] * weight
    result["total"] = sum(weighted.values()).reshape(()).numpy()
    result["logit_scale_grad"] = loss.logit_scale.grad.numpy()
    return result


def command_model_loss(data) -> dict:
    model = transformers.OneFormerForUniversalSegmentation.from_pretrained(
        str(data["model_dir"]), dropout=0.0, train_num_points=int(data["num_points"])).eval()
    batch_size = int(data["batch_size"])
    mask_labels = [torch.from_numpy(data[f"target_masks_{b}"]) for b in range(batch_size)]
    class_labels = [torch.from_numpy(data[f"target_labels_{b}"]) for b in range(batch_size)]
    recorded = {}
    get_loss_dict = model.get_loss_dict

    def recording_get_loss_dict(*arguments, **kwargs):
        recorded.update(get_loss_dict(*arguments, **kwargs))
        return recorded

    model.get_loss_dict = recording_get_loss_dict
    injected_rand, draws = injected_draws(data)
    real_rand = torch.rand
    torch.rand = injected_rand
    try:
        with torch.no_grad():
            output = model(pixel_values=torch.from_numpy(data["pixel_values"]),
                           task_inputs=torch.from_numpy(data["task_inputs"]),
                           text_inputs=torch.from_numpy(data["text_inputs"]), mask_labels=mask_labels,
                           class_labels=class_labels)
    finally:
        torch.rand = real_rand
    if draws:
        raise AssertionError(f"{len(draws)} given random tensors were not used")
    result = {name.replace("loss_cross_entropy", "loss_ce"): value.reshape(()).numpy()
              for name, value in recorded.items()}
    result["total"] = output.loss.reshape(()).numpy()
    result["contrastive_queries"] = output.transformer_decoder_contrastive_queries.numpy()
    result["text_queries"] = output.text_queries.numpy()
    return result


def command_text_mapper(data) -> dict:
    config = transformers.OneFormerConfig(
        hidden_dim=int(data["hidden_dim"]), text_encoder_context_length=int(data["context_length"]),
        text_encoder_width=int(data["width"]), text_encoder_num_layers=int(data["num_layers"]),
        text_encoder_vocab_size=int(data["vocab_size"]), text_encoder_proj_layers=int(data["projector_layers"]),
        text_encoder_n_ctx=int(data["num_context"]))
    torch.manual_seed(int(data["seed"]))
    mapper = OneFormerTextMapper(config).eval()
    # the constructor leaves the position embedding uninitialised: fill every tensor with seeded noise
    generator = torch.Generator().manual_seed(int(data["seed"]))
    with torch.no_grad():
        for parameter in mapper.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        text_queries = mapper(torch.from_numpy(data["tokens"]))
    result = {"text_queries": text_queries.numpy()}
    result.update({f"weight/{name}": value.numpy() for name, value in mapper.state_dict().items()})
    return result


def command_targets(data) -> dict:
    class_names = [str(name) for name in data["class_names"]]
    things = {int(index) for index in data["thing_ids"]}
    segment_map = torch.from_numpy(data["segment_map"])
    mapping = ({int(segment): int(label) for segment, label in zip(data["segment_ids"], data["segment_classes"])}
               if "segment_ids" in data else None)
    ignore_index = int(data["ignore_index"]) if "ignore_index" in data else None
    tasks = [str(task) for task in data["tasks"]] if "tasks" in data else ["panoptic", "instance", "semantic"]
    image = np.zeros((3, *segment_map.shape), dtype=np.uint8)
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        class_info = {str(index): {"name": name, "isthing": int(index in things)}
                      for index, name in enumerate(class_names)}
        Path(folder, "class_info.json").write_text(json.dumps(class_info))
        processor = transformers.OneFormerImageProcessor(repo_path=folder, class_info_file="class_info.json",
                                                         num_text=int(data["num_text"]), do_resize=False,
                                                         do_normalize=False, do_rescale=False)
        for task in tasks:
            encoded = processor(images=[image], task_inputs=[task], segmentation_maps=[segment_map],
                                instance_id_to_semantic_id=mapping, ignore_index=ignore_index, return_tensors="pt")
            result[f"labels_{task}"] = np.asarray(encoded["class_labels"][0])
            result[f"masks_{task}"] = np.asarray(encoded["mask_labels"][0])
            result[f"texts_{task}"] = np.array(encoded["text_inputs"][0])
    return result


def main(command: str, input_path: str, result_path: str) -> None:
    commands = {"loss": command_loss, "text-mapper": command_text_mapper, "targets": command_targets,
                "model-loss": command_model_loss}
    with np.load(input_path) as data:
        result = commands[command](data)
    np.savez(result_path, **result)


if __name__ == "__main__":
    main(*sys.argv[1:])
