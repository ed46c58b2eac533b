"""Pretraining from random weights: shape classification of the backbone, then dense (per-pixel) training of the
backbone and pixel decoder.

For networks trained from random weights (the demo models: no ImageNet weights are reachable offline), in place of
the pretrained backbone every Mask2Former / FastInst recipe starts from. A 1x1 convolution on the per-pixel features
(Mask2Former: the stride-4 mask features; FastInst: the stride-8 pixel decoder output) classifies every pixel into
the dataset's classes, trained with cross-entropy on the same augmented crops; the transformer decoder is left as
initialised and the head is discarded. Dense supervision gives every pixel a training signal, so the features learn
to tell the classes apart in a few hundred steps, where the query-based losses (a handful of matched masks per
image) take thousands; the query-based training then starts from discriminative features.

Per-pixel labels barely teach shape, though: a linear probe on the pixel decoder's features mean-pooled over each
held-out thing told its shape (disc / triangle / square / star) little better than chance after dense pretraining
(issue 5's note). ``pretrain_classification`` comes first and is the closer stand-in for ImageNet: the backbone
classifies every training thing in a window centred on it, at its own scale, from its features average-pooled over
its mask (the pooling Mask2Former's masked attention does) on the strides 8, 16 and 32. A ResNet trains its batch
norm there (and keeps it frozen afterwards, as the recipes do with pretrained backbones). The windows are at the
images' own scale whatever the network's input size, as ImageNet pretraining at 224 precedes detection at 800: at
twice the scale (96 -> 192 windows) the half-width ResNet-18 learned the shapes far slower (issue 5's note).
"""
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data.datasets import load_panoptic_ground_truth
from ..modeling.fastinst.model import FastInst
from ..modeling.matcher import SegmentationTarget
from ..preprocessing import load_image
from .config import AugmentationConfig
from .data import SegmentationTrainingDataset, contiguous_categories, normalise

IGNORE_INDEX = 255


def dense_features(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> the per-pixel features the network's masks are read from: (B, C, H/4, W/4) for Mask2Former,
    (B, C, H/8, W/8) for FastInst."""
    features = network.pixel_decoder(network.backbone(images))
    return features[-1] if isinstance(network, FastInst) else features[0]


def semantic_label_map(targets: Sequence[SegmentationTarget], size) -> torch.Tensor:
    """Semantic targets (one mask per class present) -> (B, H, W) class indices, IGNORE_INDEX where no class is."""
    label_maps = torch.full((len(targets), *size), IGNORE_INDEX, dtype=torch.int64)
    for image_index, target in enumerate(targets):
        for label, mask in zip(target.labels.tolist(), target.masks.bool()):
            label_maps[image_index][mask] = label
    return label_maps


def pretrain_dense(network: nn.Module, preprocess, rows: Sequence[Mapping[str, Any]], categories: List[Dict[str, Any]],
                   augmentation: Mapping[str, Any], epochs: int, batch_size: int, lr: float, seed: int,
                   log_every: int = 10) -> List[float]:
    """Trains ``network``'s backbone and pixel decoder in place (AdamW, weight decay 0.05, constant ``lr``) for
    ``epochs`` passes over ``rows``; returns the loss of every step."""
    classes = contiguous_categories(categories)
    dataset = SegmentationTrainingDataset(rows, classes, "semantic", preprocess, AugmentationConfig(**augmentation), seed)
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                        collate_fn=lambda samples: samples)
    torch.manual_seed(seed)
    with torch.no_grad():
        width = dense_features(network.eval(), torch.zeros(1, 3, 64, 64)).shape[1]
    head = nn.Conv2d(width, len(classes), kernel_size=1)
    parameters = [p for p in list(network.backbone.parameters()) + list(network.pixel_decoder.parameters())
                  if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    network.train()
    losses: List[float] = []
    started = time.time()
    total_steps = epochs * len(loader)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for samples in loader:
            images = torch.stack([sample.image for sample in samples])  # (B, 3, S, S)
            label_map = semantic_label_map([sample.target for sample in samples], images.shape[-2:])
            logits = F.interpolate(head(dense_features(network, images)), size=images.shape[-2:], mode="bilinear",
                                   align_corners=False)  # (B, classes, S, S)
            loss = F.cross_entropy(logits, label_map, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) % log_every == 0 or len(losses) == total_steps:
                valid = label_map != IGNORE_INDEX
                accuracy = (logits.argmax(1)[valid] == label_map[valid]).float().mean().item()
                elapsed = time.time() - started
                print(f"dense pretraining epoch {epoch + 1}/{epochs} step {len(losses)}/{total_steps}: "
                      f"loss {loss.item():.4f}, pixel accuracy {accuracy:.3f}, "
                      f"eta {elapsed / len(losses) * (total_steps - len(losses)) / 60:.1f} min", flush=True)
    network.eval()
    return losses


def thing_windows(rows: Sequence[Mapping[str, Any]], categories: List[Dict[str, Any]], window: int,
                  pad_value: int = 128) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every non-crowd thing of ``rows`` in a (window, window) crop centred on its visible box, at the image's
    scale (padded with ``pad_value`` beyond the image): (N, window, window, 3) uint8 crops, (N, window, window) bool
    masks of the thing and (N,) thing indices in ``contiguous_categories`` order."""
    things = [category for category in contiguous_categories(categories) if category.isthing]
    thing_index_of = {category.id: index for index, category in enumerate(things)}
    crops, masks, labels = [], [], []
    for row in rows:
        rgb = load_image(row["image_path"])  # (H, W, 3) uint8
        ids, segments = load_panoptic_ground_truth(row)  # (H, W) segment ids
        padded = np.pad(rgb, ((window, window), (window, window), (0, 0)), constant_values=pad_value)
        padded_ids = np.pad(ids, window)
        for segment in segments:
            if segment.get("iscrowd", 0) or int(segment["category_id"]) not in thing_index_of:
                continue
            ys, xs = np.nonzero(ids == int(segment["id"]))
            if not len(ys):
                continue
            centre_y, centre_x = (ys.min() + ys.max() + 1) // 2, (xs.min() + xs.max() + 1) // 2
            top, left = centre_y + window - window // 2, centre_x + window - window // 2
            crops.append(padded[top:top + window, left:left + window])
            masks.append(padded_ids[top:top + window, left:left + window] == int(segment["id"]))
            labels.append(thing_index_of[int(segment["category_id"])])
    if not crops:
        raise ValueError("classification pretraining needs things: the training rows have none")
    return np.stack(crops), np.stack(masks), np.asarray(labels, dtype=np.int64)


def mask_pooled_logits(backbone: nn.Module, head: nn.Linear, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """images (B, 3, S, S), masks (B, 1, S, S) float -> (B, classes): the head on the backbone's last three levels,
    each averaged over the mask (area-downsampled to the level)."""
    features = backbone(images)
    pooled = []
    for level in list(backbone.out_channels)[-3:]:
        weights = F.interpolate(masks, size=features[level].shape[-2:], mode="area")  # (B, 1, h, w)
        pooled.append((features[level] * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=1e-6))
    return head(torch.cat(pooled, dim=1))


def pretrain_classification(network: nn.Module, preprocess, rows: Sequence[Mapping[str, Any]],
                            categories: List[Dict[str, Any]], epochs: int, batch_size: int, lr: float, seed: int,
                            window: int = 96, log_every: int = 50) -> List[float]:
    """Trains ``network``'s backbone in place to tell the things of ``rows`` apart (``thing_windows`` with random
    horizontal flips, ``mask_pooled_logits``; the linear head is discarded afterwards; AdamW, weight decay 0.05, a
    one-cycle schedule peaking at ``lr``) for ``epochs`` passes; returns the loss of every step."""
    crops, masks, labels = thing_windows(rows, categories, window)
    backbone = network.backbone
    frozen_norms = getattr(backbone, "freeze_batch_norm", False)
    if frozen_norms:
        backbone.set_batch_norm_frozen(False)
    torch.manual_seed(seed)
    head = nn.Linear(sum(list(backbone.out_channels.values())[-3:]), int(labels.max()) + 1)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad] + list(head.parameters()),
                                  lr=lr, weight_decay=0.05)
    batch_size = min(batch_size, len(crops))
    steps_per_epoch = len(crops) // batch_size
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total_steps, pct_start=0.1)
    generator = np.random.default_rng(seed)
    losses: List[float] = []
    started = time.time()
    backbone.train()
    for epoch in range(epochs):
        order = generator.permutation(len(crops))
        for step in range(steps_per_epoch):
            chosen = order[step * batch_size:(step + 1) * batch_size]
            flips = generator.uniform(size=len(chosen)) < 0.5
            images = torch.stack([normalise(np.ascontiguousarray(crops[i][:, ::-1] if flip else crops[i]), preprocess)
                                  for i, flip in zip(chosen, flips)])  # (B, 3, window, window)
            thing_masks = torch.from_numpy(np.stack([masks[i][:, ::-1] if flip else masks[i]
                                                     for i, flip in zip(chosen, flips)]))[:, None].float()
            logits = mask_pooled_logits(backbone, head, images, thing_masks)  # (B, things)
            target = torch.from_numpy(labels[chosen])
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if len(losses) % log_every == 0 or len(losses) == total_steps:
                accuracy = (logits.argmax(1) == target).float().mean().item()
                elapsed = time.time() - started
                print(f"classification pretraining epoch {epoch + 1}/{epochs} step {len(losses)}/{total_steps} "
                      f"({len(crops)} things): loss {loss.item():.4f}, accuracy {accuracy:.3f}, "
                      f"eta {elapsed / len(losses) * (total_steps - len(losses)) / 60:.1f} min", flush=True)
    if frozen_norms:
        backbone.set_batch_norm_frozen(True)
    network.eval()
    return losses
