"""Dense pretraining of a network's backbone and pixel decoder as a per-pixel semantic segmenter.

For networks trained from random weights (the demo models: no ImageNet weights are reachable offline), in place of
the pretrained backbone every Mask2Former / FastInst recipe starts from. A 1x1 convolution on the per-pixel features
(Mask2Former: the stride-4 mask features; FastInst: the stride-8 pixel decoder output) classifies every pixel into
the dataset's classes, trained with cross-entropy on the same augmented crops; the transformer decoder is left as
initialised and the head is discarded. Dense supervision gives every pixel a training signal, so the features learn
to tell the classes apart in a few hundred steps, where the query-based losses (a handful of matched masks per
image) take thousands; the query-based training then starts from discriminative features.
"""
import time
from typing import Any, Dict, List, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..modeling.fastinst.model import FastInst
from ..modeling.matcher import SegmentationTarget
from .config import AugmentationConfig
from .data import SegmentationTrainingDataset, contiguous_categories

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
