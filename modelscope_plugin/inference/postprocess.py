"""Pure post-processing functions: raw logits of one image -> panoptic, semantic or instance results.

Masks are brought to the input size the way mmdet 2.x, EasyCV and detectron2 do: bilinear upsampling of the
stride-4 logits to the padded input, cropping the padding, bilinear resizing to the original size. Only the
queries a task keeps are upsampled (interpolation is per query, so the result is the same). When the original
image is no larger than the resized one (most photos: COCO's 640x480 is resized to 800x1067), the three steps are
applied as one matrix product per axis instead (``resize_operator``): the same linear map, without computing the
padded-size intermediate; values agree with the three-step path to float32 rounding.
"""
import functools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

# mmdet's panoptic id = class + instance * INSTANCE_OFFSET (stuff: instance 0); the output order follows it.
INSTANCE_OFFSET = 1000
# float pixels per group of queries that instance post-processing upsamples at once (16 MiB)
CHUNK_PIXELS = 1 << 22


@functools.lru_cache(maxsize=64)
def resize_operator(source: int, padded: int, resized: int, original: int) -> torch.Tensor:
    """(original, source) float32 matrix of the linear map that the three-step resize applies along one axis:
    linear upsampling ``source -> padded``, keeping the first ``resized`` samples, linear resampling to
    ``original`` (torch's ``align_corners=False`` arithmetic, bilinear being separable). Built by pushing the
    identity through ``F.interpolate`` itself in float64, so its index arithmetic is torch's own. Cached per size
    (a batch or a folder of one camera repeats them); callers must not modify the result."""
    identity = torch.eye(source, dtype=torch.float64)[None]  # (1, source basis vectors, source samples)
    upsampled = F.interpolate(identity, size=padded, mode="linear", align_corners=False)[..., :resized]
    return F.interpolate(upsampled, size=original, mode="linear", align_corners=False)[0].T.float()


def masks_to_original_size(mask_logits: torch.Tensor, padded_size: Tuple[int, int], resized_size: Tuple[int, int],
                           original_size: Tuple[int, int]) -> torch.Tensor:
    """(N, h, w) stride-4 logits -> (N, H, W) logits at the original image size."""
    if mask_logits.shape[0] == 0:
        return mask_logits.new_zeros((0, *original_size))
    (height, width), (original_height, original_width) = mask_logits.shape[-2:], original_size
    if original_height * original_width <= resized_size[0] * resized_size[1]:
        rows = resize_operator(height, padded_size[0], resized_size[0], original_height).to(mask_logits)  # (H, h)
        columns = resize_operator(width, padded_size[1], resized_size[1], original_width).to(mask_logits)  # (W, w)
        # the cheaper association of rows @ logits @ columns^T
        if original_height * width * (height + original_width) <= height * original_width * (width + original_height):
            return torch.matmul(torch.matmul(rows, mask_logits), columns.T)
        return torch.matmul(rows, torch.matmul(mask_logits, columns.T))
    upsampled = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
    cropped = upsampled[:, :, : resized_size[0], : resized_size[1]]
    return F.interpolate(cropped, size=original_size, mode="bilinear", align_corners=False)[0]


def first_argmax(values: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values.argmax(0)`` for (N, H, W), or ``(weights[:, None, None] * values).argmax(0)`` with (N,) ``weights``: a
    running maximum over the N maps, which reads memory in order where an argmax over the leading dimension strides
    across it (2x faster here), each weighted map made when it is compared (the same float32 products, never all N
    at once, updated in place); ties go to the first, as argmax's (NaN-free values). ``dtype``: of the (H, W)
    result (uint8 for N <= 256: 8x less memory to update per map than int64). On the CPU the loop runs in numpy,
    whose comparisons and masked writes are 2-5x faster than torch's here (same float32 arithmetic)."""
    if values.device.type == "cpu":
        index = torch.zeros(values.shape[1:], dtype=dtype)
        weights = None if weights is None else weights.detach().numpy()
        _first_argmax_numpy(values.detach().numpy(), weights, index.numpy())
        return index
    return _first_argmax_torch(values, weights, dtype)


def _first_argmax_torch(values: torch.Tensor, weights: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``first_argmax``'s loop in torch (any device)."""
    best = values[0].clone() if weights is None else values[0] * weights[0]
    current, better = torch.empty_like(best), torch.empty(best.shape, dtype=torch.bool, device=best.device)
    index = torch.zeros(values.shape[1:], dtype=dtype, device=values.device)
    for position in range(1, values.shape[0]):
        if weights is None:
            current = values[position]
        else:
            torch.mul(values[position], weights[position], out=current)
        torch.gt(current, best, out=better)
        torch.maximum(best, current, out=best)  # where(better, current, best) for values without NaN
        index.masked_fill_(better, position)
    return index


def _first_argmax_numpy(values: np.ndarray, weights: Optional[np.ndarray], index: np.ndarray) -> None:
    """``first_argmax``'s loop on (N, H, W) float32 arrays, writing the (H, W) result into ``index`` (zeros)."""
    best = values[0].copy() if weights is None else values[0] * weights[0]
    current, better = np.empty_like(best), np.empty(best.shape, dtype=bool)
    for position in range(1, values.shape[0]):
        if weights is None:
            current = values[position]
        else:
            np.multiply(values[position], weights[position], out=current)
        np.greater(current, best, out=better)
        np.maximum(best, current, out=best)
        np.putmask(index, better, position)


def at_least(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """``values >= threshold``; on the CPU by numpy, 5x faster than torch's comparison into bools here."""
    if values.device.type == "cpu":
        return torch.from_numpy(values.detach().numpy() >= threshold)
    return values >= threshold


def count_true(masks: torch.Tensor) -> List[int]:
    """(N, P) bool -> the number of true values per row; on the CPU by numpy's ``count_nonzero`` (2 ms for 38 rows of
    640x360 pixels, where torch's sum or ``count_nonzero`` first widens the bools to int64: 160 ms)."""
    if masks.device.type == "cpu":
        return [int(np.count_nonzero(row)) for row in masks.detach().numpy()]
    return torch.count_nonzero(masks, dim=1).tolist()


@dataclass
class Segment:
    label: int
    """Contiguous class index."""
    score: float
    isthing: bool
    mask: torch.Tensor
    """(H, W) bool."""
    panoptic_id: int = 0
    """mmdet's id (label + instance * INSTANCE_OFFSET); 0 for semantic and instance results."""


@dataclass
class PanopticResult:
    segments: List[Segment] = field(default_factory=list)
    """Ordered by descending panoptic id (things first), as ModelScope's built-in pipelines order them."""


def panoptic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor, num_things_classes: int,
                       padded_size, resized_size, original_size, *, object_mask_threshold: float,
                       overlap_threshold: float, filter_low_score: bool) -> PanopticResult:
    """mmdet's ``MaskFormerFusionHead.panoptic_postprocess`` (EasyCV and detectron2 agree on everything but stuff ids).

    class_logits: (Q, C + 1); mask_logits: (Q, h, w) at stride 4 of the padded input.
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = F.softmax(class_logits, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept_scores, kept_labels = scores[keep], labels[keep]
    if kept_labels.numel() == 0:
        return PanopticResult()
    # (K, H, W) for the K kept queries
    mask_probabilities = masks_to_original_size(mask_logits[keep], padded_size, resized_size, original_size).sigmoid_()
    # every pixel goes to the query with the highest score * mask probability
    count = kept_labels.shape[0]
    winner = first_argmax(mask_probabilities, kept_scores, dtype=torch.uint8 if count <= 256 else torch.int32)
    # pixels each query wins and pixels of its own mask, for all queries in one pass each
    won_areas = torch.bincount(winner.flatten(), minlength=count).tolist()
    own_masks = at_least(mask_probabilities, 0.5)
    own_areas = count_true(own_masks.flatten(1))
    segment_masks = {}  # panoptic id -> (mask, score)
    instance_id = 1
    for query, label in enumerate(kept_labels.tolist()):
        won_area, own_area = won_areas[query], own_areas[query]
        if won_area == 0 or own_area == 0:
            continue
        if won_area / own_area < overlap_threshold:
            continue
        won = winner == query
        if filter_low_score:
            won = won & own_masks[query]
        if label < num_things_classes:
            panoptic_id = label + instance_id * INSTANCE_OFFSET
            instance_id += 1
        else:
            panoptic_id = label  # stuff queries of one class merge into one segment
        if filter_low_score and not won.any():  # else ``won`` has won_area > 0 pixels
            continue
        score = float(kept_scores[query])
        if panoptic_id in segment_masks:
            previous_mask, previous_score = segment_masks[panoptic_id]
            segment_masks[panoptic_id] = (previous_mask | won, max(previous_score, score))
        else:
            segment_masks[panoptic_id] = (won, score)
    segments = [
        Segment(label=panoptic_id % INSTANCE_OFFSET, score=score,
                isthing=panoptic_id % INSTANCE_OFFSET < num_things_classes, mask=mask, panoptic_id=panoptic_id)
        for panoptic_id, (mask, score) in sorted(segment_masks.items(), key=lambda item: -item[0])
    ]
    return PanopticResult(segments)


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded_size, resized_size,
                       original_size) -> Tuple[torch.Tensor, List[Segment]]:
    """Class map = argmax over classes of sum over queries of P(class) * P(mask) (ModelScope's semantic head,
    detectron2).

    Returns the (H, W) class map and one segment per present class, by descending class id; a segment's score is
    the mean, over its pixels, of its class's share of the per-pixel class evidence.
    """
    class_probabilities = F.softmax(class_logits, dim=-1)[:, :-1]
    mask_probabilities = masks_to_original_size(mask_logits, padded_size, resized_size, original_size).sigmoid()
    # (C, H, W)
    evidence = torch.einsum("qc,qhw->chw", class_probabilities, mask_probabilities)
    return semantic_segments(evidence)


def semantic_segments(evidence: torch.Tensor) -> Tuple[torch.Tensor, List[Segment]]:
    """(C, H, W) per-class evidence -> the class map and one segment per present class (descending class id), scored
    by the mean over its pixels of its class's share of the evidence."""
    class_map = evidence.argmax(0)
    share = evidence.max(0).values / evidence.sum(0).clamp_min(1e-12)
    segments = []
    for label in torch.unique(class_map).flip(0).tolist():
        mask = class_map == label
        segments.append(Segment(label=int(label), score=float(share[mask].mean()), isthing=False, mask=mask))
    return class_map, segments


def window_semantic_evidence(class_logits: torch.Tensor, mask_logits: torch.Tensor, window_starts: Sequence[int],
                             resized_size: Tuple[int, int], original_size: Tuple[int, int]) -> torch.Tensor:
    """Per-class evidence (C, H, W) at the original size from square windows along the long side of the resized
    image, as transformers' ``EomtImageProcessor`` (``do_split_image``) and the official EoMT evaluation merge them.

    class_logits (N, Q, C + 1), mask_logits (N, Q, h, w) of the N windows. Each window's mask logits are upsampled
    to the window (S, S), and its evidence sum over queries of P(class) * sigmoid(mask logit) is computed there; the
    windows' evidence is averaged where they overlap, then resized bilinearly to the original size. (Not the order
    of ``semantic_inference``, which resizes mask logits before the sigmoid: the official recipe resizes evidence.)
    """
    window_size = min(resized_size)
    num_classes = class_logits.shape[-1] - 1
    along_height = resized_size[0] > resized_size[1]
    total = class_logits.new_zeros((num_classes, *resized_size))
    counts = class_logits.new_zeros(max(resized_size))
    for window, start in enumerate(window_starts):
        probabilities = F.interpolate(mask_logits[window][None], size=(window_size, window_size), mode="bilinear",
                                      align_corners=False)[0].sigmoid()
        # (Q, C) x (Q, S, S) -> (C, S, S)
        evidence = torch.einsum("qc,qhw->chw", F.softmax(class_logits[window], dim=-1)[:, :-1], probabilities)
        if along_height:
            total[:, start:start + window_size, :] += evidence
        else:
            total[:, :, start:start + window_size] += evidence
        counts[start:start + window_size] += 1
    # (L,) -> broadcast along the long axis
    counts = counts.clamp_min(1)[:, None] if along_height else counts.clamp_min(1)[None, :]
    return F.interpolate((total / counts)[None], size=original_size, mode="bilinear", align_corners=False)[0]


def window_semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor, window_starts: Sequence[int],
                              resized_size: Tuple[int, int],
                              original_size: Tuple[int, int]) -> Tuple[torch.Tensor, List[Segment]]:
    """``window_semantic_evidence`` -> class map (argmax over classes) and segments as ``semantic_segments``."""
    return semantic_segments(window_semantic_evidence(class_logits, mask_logits, window_starts, resized_size,
                                                      original_size))


def instance_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor, num_things_classes: int, padded_size,
                       resized_size, original_size, *, max_per_image: int, mask_from_probability: bool,
                       score_threshold: float) -> List[Segment]:
    """mmdet's ``instance_postprocess`` and detectron2's / FastInst's ``instance_inference``: top-k (query, class)
    pairs, things only, mask = logit > 0 (mmdet) or sigmoid(logit) > 0.5 (``mask_from_probability``: detectron2,
    FastInst), score = class probability * mean mask probability inside the mask. Sorted by descending score; only
    segments scoring at least ``score_threshold``."""
    num_classes = class_logits.shape[1] - 1
    scores = F.softmax(class_logits, dim=-1)[:, :-1]
    top_scores, top_indices = scores.flatten().topk(min(max_per_image, scores.numel()), sorted=False)
    labels = top_indices % num_classes
    queries = torch.div(top_indices, num_classes, rounding_mode="floor")
    # the mask score is below 1, so a pair whose class probability is under the threshold cannot reach it: such
    # pairs are dropped before their masks are upsampled (the costly step; exact, not an approximation)
    kept = (labels < num_things_classes) & (top_scores >= score_threshold)
    top_scores, labels, queries = top_scores[kept], labels[kept], queries[kept]
    # upsample each distinct query once
    unique_queries, inverse = torch.unique(queries, return_inverse=True)
    binary, mask_scores = binary_masks_and_scores(mask_logits[unique_queries], padded_size, resized_size, original_size,
                                                  mask_from_probability)
    final_scores = top_scores * mask_scores[inverse]
    order = torch.argsort(final_scores, descending=True, stable=True)
    return [
        Segment(label=int(labels[index]), score=float(final_scores[index]), isthing=True, mask=binary[inverse[index]])
        for index in order.tolist() if final_scores[index] >= score_threshold
    ]


def binary_masks_and_scores(mask_logits: torch.Tensor, padded_size, resized_size, original_size,
                            mask_from_probability: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, h, w) stride-4 or -8 logits -> (N, H, W) bool masks at the original size and (N,) mean mask probability
    inside each. Runs over groups of queries whose float maps total at most ``CHUNK_PIXELS``: the result is the
    same per query, and the full-size float maps (100 of a 640x480 photo are 123 MB, each step's temporaries as
    large again) never exist at once, which was most of the time of instance post-processing on CPU."""
    count = mask_logits.shape[0]
    binary = torch.empty((count, *original_size), dtype=torch.bool, device=mask_logits.device)
    mask_scores = mask_logits.new_empty(count)
    step = max(1, CHUNK_PIXELS // max(1, original_size[0] * original_size[1]))
    for start in range(0, count, step):
        logits = masks_to_original_size(mask_logits[start:start + step], padded_size, resized_size, original_size)
        probabilities = logits.sigmoid()
        chunk = binary[start:start + step]
        torch.gt(probabilities, 0.5, out=chunk) if mask_from_probability else torch.gt(logits, 0.0, out=chunk)
        inside = torch.where(chunk, probabilities, 0.0).flatten(1).sum(1)
        counts = torch.tensor(count_true(chunk.flatten(1)), dtype=torch.long, device=chunk.device)
        mask_scores[start:start + step] = inside / (counts + 1e-6)
    return binary, mask_scores


def mask_to_box(mask: np.ndarray) -> List[float]:
    """(x1, y1, x2, y2) of a binary mask with mmdet's ``mask2bbox`` convention (x2 = last column + 1); zeros if
    empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1)]
