"""Reference loss: transformers' ``Mask2FormerLoss`` (matcher included) on inputs from an .npz, with the random
points it draws replaced, call by call, by the points given in the .npz.

Usage: criterion_oracle.py INPUT.npz RESULT.npz

INPUT: ``num_classes``, ``num_points``, ``num_stages``, ``batch_size``; per stage s (0 = final, then auxiliary
0, 1, ...) ``class_logits_{s}`` [B,Q,C+1], ``mask_logits_{s}`` [B,Q,h,w]; per image b ``target_masks_{b}``
[T,H,W], ``target_labels_{b}`` [T]; ``num_draws`` and ``draw_{i}``: the tensors ``torch.rand`` must return, in the
order transformers calls it. RESULT: ``loss_ce`` / ``loss_mask`` / ``loss_dice`` (+ ``_{s}`` for auxiliary
stage s) and ``match_{call}_{b}_queries`` / ``_targets`` for each matcher call in order.
"""
import sys

import numpy as np
import torch
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss


def main(input_path: str, result_path: str) -> None:
    data = np.load(input_path)
    draws = [torch.from_numpy(data[f"draw_{index}"]) for index in range(int(data["num_draws"]))]
    real_rand = torch.rand

    def injected_rand(*size, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        if not draws:
            raise AssertionError(f"transformers drew more random tensors than given (shape {size})")
        draw = draws.pop(0)
        if tuple(draw.shape) != tuple(size):
            raise AssertionError(f"transformers asked torch.rand{tuple(size)}; next given draw is {tuple(draw.shape)}")
        return draw.to(kwargs.get("device") or "cpu")

    config = Mask2FormerConfig(num_labels=int(data["num_classes"]), no_object_weight=0.1, class_weight=2.0,
                               mask_weight=5.0, dice_weight=5.0, train_num_points=int(data["num_points"]),
                               oversample_ratio=3.0, importance_sample_ratio=0.75)
    loss = Mask2FormerLoss(config, weight_dict={})
    matches = []
    matcher_forward = loss.matcher.forward

    def recording_matcher(*arguments, **kwargs):
        indices = matcher_forward(*arguments, **kwargs)
        matches.append(indices)
        return indices

    loss.matcher.forward = recording_matcher
    batch_size, num_stages = int(data["batch_size"]), int(data["num_stages"])
    mask_labels = [torch.from_numpy(data[f"target_masks_{b}"]) for b in range(batch_size)]
    class_labels = [torch.from_numpy(data[f"target_labels_{b}"]) for b in range(batch_size)]
    auxiliary = [{"class_queries_logits": torch.from_numpy(data[f"class_logits_{s}"]),
                  "masks_queries_logits": torch.from_numpy(data[f"mask_logits_{s}"])} for s in range(1, num_stages)]
    torch.rand = injected_rand
    try:
        losses = loss(masks_queries_logits=torch.from_numpy(data["mask_logits_0"]),
                      class_queries_logits=torch.from_numpy(data["class_logits_0"]),
                      mask_labels=mask_labels, class_labels=class_labels, auxiliary_predictions=auxiliary)
    finally:
        torch.rand = real_rand
    if draws:
        raise AssertionError(f"{len(draws)} given random tensors were not used")
    result = {name.replace("loss_cross_entropy", "loss_ce"): value.detach().numpy() for name, value in losses.items()}
    for call, indices in enumerate(matches):
        for image, (queries, targets) in enumerate(indices):
            result[f"match_{call}_{image}_queries"] = np.asarray(queries)
            result[f"match_{call}_{image}_targets"] = np.asarray(targets)
    np.savez(result_path, **result)


if __name__ == "__main__":
    main(*sys.argv[1:])
