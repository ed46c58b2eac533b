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
(measured while training the demo models). ``pretrain_classification`` comes first and is the closer stand-in for
ImageNet: the backbone classifies every training thing from its features average-pooled over its mask (the pooling
Mask2Former's masked attention does) on the strides 8, 16 and 32, computed on the whole image at its own scale, as
the segmenter will see it. A ResNet trains its batch norm there (and keeps it frozen afterwards, as the recipes do
with pretrained backbones). Windows centred on each thing learn faster but do not transfer: a classifier at 80 % on
held-out windows told the same things, pooled from their whole images, 32 % of the time (chance: 25 %).
"""
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from modelscope_plugin.data.datasets import load_panoptic_ground_truth
from modelscope_plugin.inference.preprocess import load_image
from modelscope_plugin.modeling.fastinst.model import FastInst
from modelscope_plugin.modeling.matcher import SegmentationTarget
from modelscope_plugin.training.config import AugmentationConfig
from modelscope_plugin.training.data import SegmentationTrainingDataset, build_target, contiguous_categories, normalise

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
    dataset = SegmentationTrainingDataset(rows, classes, "semantic", preprocess, AugmentationConfig(**augmentation),
                                          seed)
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


@dataclass
class SceneThings:
    """One image's things: ``image`` (H, W, 3) uint8, ``thing_map`` (H, W) uint8 with 0 where no thing is and k
    on the k-th thing's pixels, ``labels`` (K,) thing indices in ``contiguous_categories`` order."""

    image: np.ndarray
    thing_map: np.ndarray
    labels: np.ndarray

    def flipped(self) -> "SceneThings":
        return SceneThings(self.image[:, ::-1], self.thing_map[:, ::-1], self.labels)

    def masks(self) -> torch.Tensor:
        """(K, 1, H, W) float masks of the things."""
        thing_map = torch.from_numpy(np.ascontiguousarray(self.thing_map))
        return (thing_map[None] == torch.arange(1, len(self.labels) + 1)[:, None, None]).float()[:, None]


def scene_things(rows: Sequence[Mapping[str, Any]], categories: List[Dict[str, Any]]) -> List[SceneThings]:
    """The non-crowd, visible things of every row that has any (``build_target``'s instance targets), at the image's
    own size."""
    classes = contiguous_categories(categories)
    class_index_of = {category.id: index for index, category in enumerate(classes)}
    thing_ids = [category.id for category in classes if category.isthing]
    scenes = []
    for row in rows:
        ids, segments = load_panoptic_ground_truth(row)  # (H, W) segment ids
        # things come first in the class order, so an instance label is the thing's index
        target = build_target(ids, segments, class_index_of, thing_ids, "instance")
        if not len(target.labels):
            continue
        if len(target.labels) > 255:
            raise ValueError(f"{row['image_path']}: {len(target.labels)} things; the classification pretraining keeps "
                             "255 per image")
        thing_map = np.zeros(ids.shape, dtype=np.uint8)
        for index, mask in enumerate(target.masks.bool().numpy()):
            thing_map[mask] = index + 1
        scenes.append(SceneThings(load_image(row["image_path"]), thing_map, target.labels.numpy()))
    if not scenes:
        raise ValueError("classification pretraining needs things: the training rows have none")
    return scenes


def mask_pooled_logits(backbone: nn.Module, head: nn.Linear, images: torch.Tensor, masks: torch.Tensor,
                       image_index: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W), masks (N, 1, H, W) float, image_index (N,) the image of each mask -> (N, classes): the
    head on the backbone's last three levels of each mask's image, each averaged over the mask (area-downsampled
    to the level)."""
    features = backbone(images)
    pooled = []
    for level in list(backbone.out_channels)[-3:]:
        weights = F.interpolate(masks, size=features[level].shape[-2:], mode="area")  # (N, 1, h, w)
        level_features = features[level][image_index]  # (N, C, h, w)
        pooled.append((level_features * weights).sum(dim=(2, 3)) / weights.sum(dim=(2, 3)).clamp(min=1e-6))
    return head(torch.cat(pooled, dim=1))


def scene_batch(scenes: Sequence[SceneThings], preprocess) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """(images (B, 3, H, W) normalised and zero-padded bottom / right to the largest, masks (N, 1, H, W),
    image_index (N,), labels (N,)) for ``mask_pooled_logits``."""
    height = max(scene.image.shape[0] for scene in scenes)
    width = max(scene.image.shape[1] for scene in scenes)
    images, masks, image_index = [], [], []
    for index, scene in enumerate(scenes):
        image = normalise(np.ascontiguousarray(scene.image), preprocess)  # (3, h, w)
        padding = (0, width - image.shape[2], 0, height - image.shape[1])
        images.append(F.pad(image, padding))
        masks.append(F.pad(scene.masks(), padding))
        image_index += [index] * len(scene.labels)
    labels = torch.from_numpy(np.concatenate([scene.labels for scene in scenes]))
    return torch.stack(images), torch.cat(masks), torch.tensor(image_index), labels


def classification_accuracy(backbone: nn.Module, head: nn.Linear, scenes: Sequence[SceneThings], preprocess,
                            batch_size: int) -> float:
    """The share of the things of ``scenes`` that ``mask_pooled_logits`` classifies right (eval mode)."""
    backbone.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            images, masks, image_index, labels = scene_batch(scenes[start:start + batch_size], preprocess)
            right += int((mask_pooled_logits(backbone, head, images, masks, image_index).argmax(1) == labels).sum())
    return right / sum(len(scene.labels) for scene in scenes)


def pretrain_classification(network: nn.Module, preprocess, rows: Sequence[Mapping[str, Any]],
                            categories: List[Dict[str, Any]], epochs: int, batch_size: int, lr: float, seed: int,
                            evaluation_rows: Sequence[Mapping[str, Any]] = (), log_every: int = 50) -> List[float]:
    """Trains ``network``'s backbone in place to tell the things of ``rows`` apart (``scene_things``, ``batch_size``
    whole images a step with random horizontal flips, ``mask_pooled_logits``; the linear head is discarded
    afterwards; AdamW, weight decay 0.05, a one-cycle schedule peaking at ``lr``) for ``epochs`` passes; prints the
    accuracy on the things of ``evaluation_rows`` after every epoch; returns the loss of every step."""
    scenes = scene_things(rows, categories)
    evaluation_scenes = scene_things(evaluation_rows, categories) if evaluation_rows else []
    num_things = sum(len(scene.labels) for scene in scenes)
    num_classes = sum(1 for category in contiguous_categories(categories) if category.isthing)
    backbone = network.backbone
    frozen_norms = getattr(backbone, "freeze_batch_norm", False)
    if frozen_norms:
        backbone.set_batch_norm_frozen(False)
    torch.manual_seed(seed)
    head = nn.Linear(sum(list(backbone.out_channels.values())[-3:]), num_classes)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad] + list(head.parameters()),
                                  lr=lr, weight_decay=0.05)
    batch_size = min(batch_size, len(scenes))
    steps_per_epoch = len(scenes) // batch_size
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=total_steps, pct_start=0.1)
    generator = np.random.default_rng(seed)
    losses: List[float] = []
    started = time.time()
    for epoch in range(epochs):
        backbone.train()
        order = generator.permutation(len(scenes))
        for step in range(steps_per_epoch):
            chosen = order[step * batch_size:(step + 1) * batch_size]
            flips = generator.uniform(size=len(chosen)) < 0.5
            batch = [scenes[i].flipped() if flip else scenes[i] for i, flip in zip(chosen, flips)]
            images, masks, image_index, target = scene_batch(batch, preprocess)
            logits = mask_pooled_logits(backbone, head, images, masks, image_index)  # (N, classes)
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
                      f"({len(scenes)} images, {num_things} things): loss {loss.item():.4f}, accuracy {accuracy:.3f}, "
                      f"eta {elapsed / len(losses) * (total_steps - len(losses)) / 60:.1f} min", flush=True)
        if evaluation_scenes:
            accuracy = classification_accuracy(backbone, head, evaluation_scenes, preprocess, batch_size)
            print(f"classification pretraining epoch {epoch + 1}/{epochs}: held-out accuracy {accuracy:.3f} "
                  f"({len(evaluation_scenes)} images)", flush=True)
    if frozen_norms:
        backbone.set_batch_norm_frozen(True)
    network.eval()
    return losses
