"""FastInst's training loss (official ``fastinst/modeling/criterion.py``, ``matcher.py`` and the decoder's training
path).

On top of Mask2Former's set loss (``modeling.criterion``: cross-entropy with "no object" weighted 0.1, point-sampled
BCE and dice on uncertain points, masks counted across ranks), FastInst adds:

- the location cost: a query may only be matched cheaply to an instance whose mask covers the stride-16 pixel it
  was taken from; the matcher adds ``location_weight`` (1000) x ``location_cost.query_location_cost`` (-1 inside,
  0 outside) to the class / mask / dice costs of every prediction stage;
- the instance-activation (proposal) loss: the auxiliary class head's (B, C + 1, h, w) map is matched per image
  to the targets with ``class_weight`` x -P(label) + ``location_weight`` x -[the pixel covers part of the
  instance] over all h*w pixels; matched pixels learn their target's class, all other pixels "no object", with an
  unweighted cross-entropy averaged over every pixel (``loss_proposal``, weight 20);
- ground-truth mask-guided learning: every decoder layer runs once more on its own input, its queries attending
  only inside the instance they were matched to at the last stage (``FastInstDecoder.guided_forward``); those
  predictions are supervised with the last stage's matching.

Terms and names as official FastInst: ``loss_ce`` / ``loss_mask`` / ``loss_dice`` of the last stage, then suffixes
``_0`` .. ``_{L-1}`` for the L guided passes and ``_L`` .. ``_{2L-1}`` for the stages before each layer (deep
supervision), and ``loss_proposal``. One deliberate difference: the last stage is matched once, and that matching
serves both its own loss and the guidance (official matches it twice, once in the decoder and once in the
criterion, with independently drawn points; both solve the same assignment problem).
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from modelscope_plugin.modeling.criterion import Mask2FormerCriterion, MatchIndices, global_normalisers
from modelscope_plugin.modeling.fastinst.location_cost import (
    ground_truth_attention_mask,
    proposal_location_cost,
    query_location_cost,
)
from modelscope_plugin.modeling.fastinst.model import FastInstOutput
from modelscope_plugin.modeling.fastinst.transformer_decoder import FastInstDecoder
from modelscope_plugin.modeling.matcher import HungarianMatcher, SegmentationTarget
from modelscope_plugin.modeling.point_sampling import PointSampler


class FastInstCriterion(Mask2FormerCriterion):
    """Official FastInst weights: class 2, mask 5, dice 5 (loss and matching), location 1000 (matching only),
    proposal 20, "no object" 0.1; 12544 points, 3x oversampling, 75 % importance-sampled."""

    def __init__(self, num_classes: int, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 location_weight: float = 1000.0, proposal_weight: float = 20.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        super().__init__(num_classes, matcher, class_weight=class_weight, mask_weight=mask_weight,
                         dice_weight=dice_weight, no_object_weight=no_object_weight, num_points=num_points,
                         oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio)
        self.location_weight = location_weight
        self.weights["loss_proposal"] = proposal_weight

    @torch.no_grad()
    def match_proposals(self, proposal_class_logits: torch.Tensor,
                        targets: Sequence[SegmentationTarget]) -> MatchIndices:
        """(B, C + 1, h, w) auxiliary class logits -> per image (flat pixel indices, target indices)."""
        height, width = proposal_class_logits.shape[-2:]
        indices = []
        for logits, target in zip(proposal_class_logits, targets):
            if target.labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            # (C + 1, h, w) -> (h*w, C + 1)
            probabilities = logits.float().flatten(1).transpose(0, 1).softmax(-1)
            class_cost = -probabilities[:, target.labels.to(probabilities.device)]
            location_cost = proposal_location_cost((height, width), target.masks).to(class_cost)
            cost = self.matcher.class_weight * class_cost + self.location_weight * location_cost
            pixel_indices, target_indices = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(pixel_indices, dtype=torch.int64),
                            torch.as_tensor(target_indices, dtype=torch.int64)))
        return indices

    def proposal_loss(self, proposal_class_logits: torch.Tensor, targets: Sequence[SegmentationTarget],
                      indices: MatchIndices) -> torch.Tensor:
        """Unweighted cross-entropy, mean over all B*h*w pixels; unmatched pixels are "no object"."""
        # (B, C + 1, h, w) -> (B, C + 1, h*w)
        logits = proposal_class_logits.float().flatten(2)
        target_classes = torch.full((logits.shape[0], logits.shape[2]), self.num_classes, dtype=torch.int64,
                                    device=logits.device)
        for image_index, ((pixel_indices, target_indices), target) in enumerate(zip(indices, targets)):
            target_classes[image_index, pixel_indices.to(logits.device)] = \
                target.labels[target_indices.to(target.labels.device)].to(logits.device)
        return F.cross_entropy(logits, target_classes)

    def location_costs(self, query_locations: torch.Tensor,
                       targets: Sequence[SegmentationTarget]) -> List[torch.Tensor]:
        """Per image the weighted (Q, T) location cost (the same query locations at every stage)."""
        return [self.location_weight * query_location_cost(locations.float(), target.masks.float())
                for locations, target in zip(query_locations, targets)]

    def supervised_losses(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          targets: Sequence[SegmentationTarget], indices: MatchIndices, num_masks: float,
                          class_weight_total: float, sampler: PointSampler) -> Dict[str, torch.Tensor]:
        losses = self.mask_losses(mask_logits, targets, indices, num_masks, sampler)
        losses["loss_ce"] = self.class_loss(class_logits, targets, indices, class_weight_total)
        return losses

    def forward(self, output: FastInstOutput, targets: Sequence[SegmentationTarget], sampler: PointSampler,
                decoder: FastInstDecoder) -> Dict[str, torch.Tensor]:
        """Unweighted terms (``total`` weights them). ``output`` is the network's training-mode output; ``decoder``
        (the network's ``transformer_decoder``) runs the ground-truth-guided passes."""
        if output.query_locations is None or output.decoder_state is None:
            raise ValueError("FastInstCriterion needs the network's training-mode output (query locations and the "
                             "decoder state); call network.train() before the forward pass")
        num_queries = output.class_logits.shape[1]
        num_masks, class_weight_total = global_normalisers(targets, num_queries, float(self.class_weights[-1]),
                                                           output.class_logits.device)
        losses: Dict[str, torch.Tensor] = {}
        proposal_indices = self.match_proposals(output.proposal_class_logits, targets)
        losses["loss_proposal"] = self.proposal_loss(output.proposal_class_logits, targets, proposal_indices)

        location_costs = self.location_costs(output.query_locations, targets)
        final_indices = self.matcher(output.class_logits, output.mask_logits, targets, sampler,
                                     additional_costs=location_costs)
        losses.update(self.supervised_losses(output.class_logits, output.mask_logits, targets, final_indices,
                                             num_masks, class_weight_total, sampler))

        guide = ground_truth_attention_mask([target.masks for target in targets], final_indices, num_queries,
                                            decoder.num_aux_queries, output.decoder_state.pixel_size)
        guided_class_logits, guided_mask_logits = decoder.guided_forward(output.decoder_state, guide)
        stages: List[Tuple[torch.Tensor, torch.Tensor, bool]] = \
            [(class_logits, mask_logits, True) for class_logits, mask_logits
             in zip(guided_class_logits, guided_mask_logits)]
        stages += [(class_logits, mask_logits, False) for class_logits, mask_logits
                   in zip(output.auxiliary_class_logits, output.auxiliary_mask_logits)]
        for stage, (class_logits, mask_logits, guided) in enumerate(stages):
            indices = final_indices if guided else self.matcher(class_logits, mask_logits, targets, sampler,
                                                                additional_costs=location_costs)
            stage_losses = self.supervised_losses(class_logits, mask_logits, targets, indices, num_masks,
                                                  class_weight_total, sampler)
            losses.update({f"{name}_{stage}": value for name, value in stage_losses.items()})
        return losses
