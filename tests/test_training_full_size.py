"""Full-size R50 Mask2Former (100 queries, 9 decoder layers, 133 classes): two training iterations at 512 x 512 on
CPU with the package's criterion and parameter groups; the loss is finite and decreases on the repeated batch."""
import numpy as np
import torch

from modelscope_plugin.builders import build_mask2former
from modelscope_plugin.config import resnet50_coco_panoptic
from modelscope_plugin.data.categories import COCO_PANOPTIC_CATEGORIES
from modelscope_plugin.data.synthetic import SceneConfig, generate_scene, scene_segments
from modelscope_plugin.modeling.criterion import Mask2FormerCriterion
from modelscope_plugin.modeling.matcher import HungarianMatcher
from modelscope_plugin.modeling.point_sampling import PointSampler
from modelscope_plugin.training.config import ParameterGroupConfig
from modelscope_plugin.training.data import build_target, normalise
from modelscope_plugin.training.optimizer import build_optimizer

def test_r50_trains_two_iterations_at_512():
    torch.manual_seed(0)
    config = resnet50_coco_panoptic()
    network = build_mask2former(config).train()
    scene = generate_scene(np.random.default_rng(0), SceneConfig.scaled(512))
    ids, segments = scene_segments(scene)
    # synthetic classes stand in for COCO ones: things -> the first thing ids, stuff -> the first stuff ids
    thing_ids = [c.id for c in COCO_PANOPTIC_CATEGORIES if c.isthing][:4]
    stuff_ids = [c.id for c in COCO_PANOPTIC_CATEGORIES if not c.isthing][:3]
    stand_in = dict(zip(range(1, 8), thing_ids + stuff_ids))
    segments = [dict(segment, category_id=stand_in[segment["category_id"]]) for segment in segments]
    class_index = {c.id: index for index, c in enumerate(COCO_PANOPTIC_CATEGORIES)}
    target = build_target(ids, segments, class_index, thing_ids, "panoptic")
    images = normalise(scene.image, config.preprocess)[None]
    criterion = Mask2FormerCriterion(config.num_classes, HungarianMatcher())
    optimizer = build_optimizer(network, {"type": "AdamW", "lr": 1e-4, "weight_decay": 0.05}, ParameterGroupConfig())
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        terms = criterion(network(images), [target], PointSampler.from_seeds([0]))
        total = criterion.total(terms)
        total.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 0.01)
        optimizer.step()
        losses.append(total.item())
    assert len(terms) == 3 * (config.decoder_layers + 1)
    assert all(np.isfinite(losses)) and losses[1] < losses[0], losses
