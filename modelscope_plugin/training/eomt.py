"""EoMT's training recipe: the per-block annealing of masked attention, layer-wise learning-rate decay and the AdamW
optimiser of the official EoMT training (Kerssies et al., CVPR 2025).

- Loss: Mask2Former's criterion (``modeling/criterion.py``) on the final prediction and on the prediction made
  before every query block (``Eomt.forward`` returns them in training), each matched on its own and weighted alike.
- Masked attention: query block ``i`` keeps its mask with probability 1 until step ``starts[i]``, then
  ``(1 - progress) ** power`` (polynomial, power 0.9) until ``ends[i]``, 0 from there on; the blocks anneal one
  after another, so a finished network runs without masks.
  Which queries keep their masks is drawn per image from a seed of (seed, step, position in the global batch)
  (``seeded_mask_draws``), so two ranks train as one process on the same global batch, and a resumed run as an
  uninterrupted one.
- Learning rates: ``lr`` for the queries, heads, upscaling layers and the ViT's final norm; ViT block ``b`` of ``N``
  at ``lr * layer_decay ** (N - 1 - b)``, the embeddings (patches, class / register tokens, positions) as block 0.
- Optimiser: ``torch.optim.AdamW`` with weight decay 0.05 on every parameter.
- Schedule (two-stage warm-up, then polynomial decay with power 0.9): the parts outside the ViT warm up linearly
  over the first ``warmup[0]`` steps while the ViT (blocks, embeddings, final norm) stays at rate 0, then the ViT
  warms up over ``warmup[1]`` steps; each then decays as ``(1 - progress) ** 0.9`` to the last step. The official
  warm-ups, 500 and 1000 steps, take a tenth of a run of ``WARMUP_SCALING_STEPS`` (15000) steps and less of the
  official runs (88716 steps for COCO, about 39120 for ADE20K); in a shorter run, unless set explicitly, both are scaled
  to it (``default_warmup``), so they still take at most a tenth of the run.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.trainers.hooks.hook import Hook
from modelscope.trainers.hooks.priority import Priority

from modelscope_plugin.errors import TrainingConfigError
from modelscope_plugin.modeling.eomt.model import Eomt


@dataclass
class EomtTrainingConfig:
    """The official EoMT training settings (its defaults for COCO and ADE20K)."""

    lr: float = 1e-4
    layer_decay: float = 0.8
    """Each ViT block below the last trains at this factor of the one above it."""
    weight_decay: float = 0.05
    poly_power: float = 0.9
    """Power of the polynomial masked-attention annealing."""


def mask_probability(step: int, start: int, end: int, power: float = 0.9) -> float:
    """Masked-attention probability of one query block at ``step``: 1 before ``start``, 0 from ``end`` on,
    ``(1 - (step - start) / (end - start)) ** power`` between."""
    if end <= start:
        raise ValueError(f"annealing end {end} must come after its start {start}")
    if step < start:
        return 1.0
    if step >= end:
        return 0.0
    return (1.0 - (step - start) / (end - start)) ** power


def annealing_steps(total_steps: int, num_query_blocks: int) -> Tuple[List[int], List[int]]:
    """(starts, ends) placed as in the official configurations: a unit ``u = total_steps // (blocks + 2)``, block
    ``i`` annealing over ``[(i + 1) u, (i + 2) u)``, so the last block reaches 0 a unit before the end of training
    (their units: 14782 steps for COCO and 6520 for ADE20K, with 4 query blocks, about a sixth of the training)."""
    unit = total_steps // (num_query_blocks + 2)
    if unit < 1:
        raise ValueError(f"{total_steps} steps are too few to anneal {num_query_blocks} blocks")
    return ([(block + 1) * unit for block in range(num_query_blocks)],
            [(block + 2) * unit for block in range(num_query_blocks)])


def anneal_masks(network: Eomt, step: int, starts: Sequence[int], ends: Sequence[int],
                 power: float = 0.9) -> List[float]:
    """Sets ``network.attention_mask_probabilities`` for ``step`` (one value per query block) and returns them."""
    if not len(starts) == len(ends) == network.num_query_blocks:
        raise ValueError(f"{len(starts)} starts and {len(ends)} ends for {network.num_query_blocks} query blocks")
    values = [mask_probability(step, start, end, power) for start, end in zip(starts, ends)]
    with torch.no_grad():
        network.attention_mask_probabilities.copy_(torch.tensor(values))
    return values


MASK_DRAW_STREAM = 1
"""The word that follows (seed, step, position) in a mask-draw seed, so that an image's masked-attention draws and
its point sampler (``training.data.point_seed``: the same three words) are independent."""


def mask_draw_seed(seed: int, step: int, position: int) -> int:
    """Seed of the masked-attention draws of the image at ``position`` of the global batch of ``step``."""
    state = np.random.SeedSequence([seed, step, position, MASK_DRAW_STREAM]).generate_state(1, np.uint64)[0]
    return int(state % (2 ** 63))


def seeded_mask_draws(seeds: Sequence[int], num_query_blocks: int, num_queries: int) -> torch.Tensor:
    """(B, num_query_blocks, num_queries) uniform draws in [0, 1) for ``Eomt.forward``'s ``mask_draws``, image
    ``b``'s from a generator seeded with ``seeds[b]``: the same whatever the ranks and batch an image trains in, and
    after a resume."""
    return torch.stack([torch.rand((num_query_blocks, num_queries), generator=torch.Generator().manual_seed(seed))
                        for seed in seeds])


VIT_PARTS = ("blocks", "embeddings", "norm")
"""Top-level modules of ``Eomt`` that belong to the ViT (the rest: queries, heads, upscaling layers)."""


def eomt_parameter_groups(network: Eomt, lr: float, layer_decay: float, weight_decay: float) -> List[Dict[str, Any]]:
    """One group per (part, learning rate) (see the module docstring): the parts outside the ViT first, then the
    ViT's groups by descending rate; each group lists its parameter ``names`` and ``vit`` (whether it is the ViT's).
    Frozen parameters are left out."""
    num_blocks = len(network.blocks)
    groups: Dict[Tuple[bool, float], Dict[str, Any]] = {}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        parts = name.split(".")
        if parts[0] == "blocks":
            group_lr = lr * layer_decay ** (num_blocks - 1 - int(parts[1]))
        elif parts[0] == "embeddings":
            group_lr = lr * layer_decay ** (num_blocks - 1)
        else:  # the final norm, queries, class and mask heads, upscaling layers
            group_lr = lr
        vit = parts[0] in VIT_PARTS
        group = groups.setdefault((vit, group_lr), {"params": [], "lr": group_lr, "weight_decay": weight_decay,
                                                    "names": [], "vit": vit})
        group["params"].append(parameter)
        group["names"].append(name)
    return sorted(groups.values(), key=lambda group: (group["vit"], -group["lr"]))


def learning_rate_factor(step: int, vit: bool, total_steps: int, warmup: Tuple[int, int] = (500, 1000),
                         power: float = 0.9) -> float:
    """The factor of a group's base rate at ``step`` under the two-stage warm-up and polynomial decay (see the
    module docstring); ``vit``: whether the group is the ViT's."""
    head_warmup, vit_warmup = warmup
    if not vit:
        if step < head_warmup:
            return step / head_warmup
        return max(0.0, 1.0 - (step - head_warmup) / max(1, total_steps - head_warmup)) ** power
    if step < head_warmup:
        return 0.0
    if step < head_warmup + vit_warmup:
        return (step - head_warmup) / vit_warmup
    decay_steps = max(1, total_steps - head_warmup - vit_warmup)
    return max(0.0, 1.0 - (step - head_warmup - vit_warmup) / decay_steps) ** power


def build_eomt_optimizer(network: Eomt, settings: EomtTrainingConfig = EomtTrainingConfig()) -> torch.optim.AdamW:
    """AdamW over ``eomt_parameter_groups`` with the settings' rate, decay and weight decay (each group keeps its
    ``vit`` flag for ``build_eomt_scheduler``)."""
    groups = eomt_parameter_groups(network, settings.lr, settings.layer_decay, settings.weight_decay)
    for group in groups:
        group.pop("names")
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def build_eomt_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: Tuple[int, int] = (500, 1000),
                         power: float = 0.9) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step ``learning_rate_factor`` for each group of ``build_eomt_optimizer``'s optimiser (call ``step()``
    after each optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [
        (lambda step, vit=bool(group["vit"]): learning_rate_factor(step, vit, total_steps, warmup, power))
        for group in optimizer.param_groups])


def training_step(network: Eomt, criterion, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets,
                  sampler, step: int, starts: Sequence[int], ends: Sequence[int], power: float = 0.9) -> float:
    """One optimisation step of the recipe: the masks annealed for ``step``, the network in training mode on
    ``images`` (B, 3, S, S), Mask2Former's criterion on the final and every query block's prediction, AdamW.
    Returns the weighted total loss."""
    anneal_masks(network, step, starts, ends, power)
    network.train()
    output = network(images)
    total = criterion.total(criterion(output, targets, sampler))
    if not torch.isfinite(total):
        raise FloatingPointError(f"step {step}: the loss is {total.item()}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return float(total.detach())


def build_layer_decay_optimizer(network: Eomt, optimizer_config: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``train.optimizer`` of an EoMT = {type: a torch.optim class name, lr, weight_decay, layer_decay, ...other
    constructor arguments}: the optimiser over ``eomt_parameter_groups`` (layer_decay default 0.8)."""
    values = dict(optimizer_config)
    type_name = values.pop("type", "AdamW")
    optimizer_class = getattr(torch.optim, str(type_name), None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TrainingConfigError(f"train.optimizer.type {type_name!r} is not a torch.optim optimizer")
    if "lr" not in values:
        raise TrainingConfigError("train.optimizer needs an lr")
    lr, weight_decay = float(values.pop("lr")), float(values.pop("weight_decay", 0.0))
    layer_decay = float(values.pop("layer_decay", EomtTrainingConfig.layer_decay))
    if not 0.0 < layer_decay <= 1.0:
        raise TrainingConfigError(f"train.optimizer.layer_decay must be in (0, 1], not {layer_decay}")
    groups = eomt_parameter_groups(network, lr, layer_decay, weight_decay)
    for group in groups:
        group.pop("names")
    return optimizer_class(groups, lr=lr, weight_decay=weight_decay, **values)


@dataclass
class MaskAnnealing:
    """``train.mask_annealing`` of an EoMT: per query block the step its masked attention starts to fade and the step
    it is gone (``mask_probability``); empty lists: ``annealing_steps`` over the run's iterations."""

    starts: Tuple[int, ...] = ()
    ends: Tuple[int, ...] = ()
    power: float = 0.9

    def checked(self, num_query_blocks: int) -> "MaskAnnealing":
        """The settings, or a ``TrainingConfigError`` naming what is wrong."""
        starts, ends = tuple(int(step) for step in self.starts), tuple(int(step) for step in self.ends)
        if (starts or ends) and not len(starts) == len(ends) == num_query_blocks:
            raise TrainingConfigError(f"train.mask_annealing: {len(starts)} starts and {len(ends)} ends for the "
                                      f"model's {num_query_blocks} query blocks")
        for block, (start, end) in enumerate(zip(starts, ends)):
            if not 0 <= start < end:
                raise TrainingConfigError(f"train.mask_annealing: block {block} starts at {start} and ends at {end}; "
                                          "need 0 <= start < end")
        if not self.power > 0:
            raise TrainingConfigError(f"train.mask_annealing.power must be above 0, not {self.power}")
        return MaskAnnealing(starts, ends, float(self.power))

    def steps(self, total_steps: int, num_query_blocks: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(starts, ends) for a run of ``total_steps`` iterations."""
        if self.starts:
            return self.starts, self.ends
        if total_steps // (num_query_blocks + 2) < 1:
            raise TrainingConfigError(f"{total_steps} iterations are too few to anneal {num_query_blocks} query "
                                      "blocks (the official placement needs at least blocks + 2); give "
                                      "train.mask_annealing.starts / ends")
        starts, ends = annealing_steps(total_steps, num_query_blocks)
        return tuple(starts), tuple(ends)


@HOOKS.register_module(module_name="EomtMaskAnnealingHook", force=True)
class EomtMaskAnnealingHook(Hook):
    """Sets the EoMT's masked-attention probabilities from the trainer's iteration before every training
    iteration (``anneal_masks``); a function of the iteration alone, so a resumed run continues the schedule."""

    PRIORITY = Priority.HIGH

    def __init__(self, annealing: MaskAnnealing):
        self.annealing = annealing
        self.starts: Tuple[int, ...] = ()
        self.ends: Tuple[int, ...] = ()

    def before_run(self, trainer):
        network = trainer.unwrap_module(trainer.model)
        self.starts, self.ends = self.annealing.steps(trainer.max_iters, network.num_query_blocks)

    def before_train_iter(self, trainer):
        anneal_masks(trainer.unwrap_module(trainer.model), trainer.iter, self.starts, self.ends,
                     self.annealing.power)


OFFICIAL_WARMUP = (500, 1000)
"""The official warm-up steps: the parts outside the ViT, then the ViT."""
WARMUP_SCALING_STEPS = 15000
"""The shortest run that keeps ``OFFICIAL_WARMUP`` unscaled (the warm-ups then take a tenth of it)."""


def default_warmup(total_steps: int) -> Tuple[int, int]:
    """The warm-up of a run of ``total_steps`` that sets none: ``OFFICIAL_WARMUP`` from ``WARMUP_SCALING_STEPS``
    steps on; in a shorter run both stages scaled by ``total_steps / WARMUP_SCALING_STEPS`` and rounded down
    (``total_steps // 30`` and ``total_steps // 15``), so together they take at most a tenth of the run. They then
    end before the default annealing (``annealing_steps``) starts to fade the first query block, at
    ``total_steps // (blocks + 2)``, as in the official runs (for up to 8 query blocks)."""
    if total_steps >= WARMUP_SCALING_STEPS:
        return OFFICIAL_WARMUP
    return (OFFICIAL_WARMUP[0] * total_steps // WARMUP_SCALING_STEPS,
            OFFICIAL_WARMUP[1] * total_steps // WARMUP_SCALING_STEPS)


EOMT_SCHEDULER_TYPE = "EomtWarmupPolyLR"
"""``train.lr_scheduler.type`` of the official schedule (``build_eomt_scheduler``)."""


@dataclass
class EomtSchedule:
    """``train.lr_scheduler`` of type ``EOMT_SCHEDULER_TYPE``: the warm-up steps (outside the ViT, then the ViT;
    None: ``default_warmup`` of the run), the decay's power, and the run's iterations (``total_iters``; None: the
    trainer's)."""

    warmup: Optional[Tuple[int, int]] = None
    power: float = 0.9
    total_iters: Optional[int] = None

    def warmup_for(self, total_steps: int, where: str = "train.lr_scheduler") -> Tuple[int, int]:
        """The warm-up steps of a run of ``total_steps``: the explicit ones, which must end before the run does
        (else a ``TrainingConfigError`` naming them), or ``default_warmup``."""
        if self.warmup is None:
            return default_warmup(total_steps)
        if sum(self.warmup) >= total_steps:
            raise TrainingConfigError(
                f"{where}.warmup {list(self.warmup)} ({sum(self.warmup)} steps) does not end before the run of "
                f"{total_steps} iterations does: the ViT would never train at its learning rate; give warm-ups "
                "that sum to fewer steps, or leave warmup out to have the official one scaled to the run")
        return self.warmup


def eomt_schedule_from(values: Mapping[str, Any], where: str = "train.lr_scheduler") -> EomtSchedule:
    """An ``EomtSchedule`` from ``{type, warmup (absent or null: the run's default), power, total_iters, options:
    {by_epoch: false}}``, or a ``TrainingConfigError`` naming what is wrong."""
    values = dict(values)
    values.pop("type", None)
    options = dict(values.pop("options", None) or {})
    if options.get("by_epoch", False) or set(options) - {"by_epoch"}:
        raise TrainingConfigError(f"{where}.options: {EOMT_SCHEDULER_TYPE} steps per iteration; only "
                                  f"by_epoch false is accepted, not {options}")
    known = {"warmup", "power", "total_iters"}
    if set(values) - known:
        raise TrainingConfigError(f"unknown {where} keys {sorted(set(values) - known)}; known: {sorted(known)}")
    warmup = values.get("warmup")
    if warmup is not None:
        warmup = tuple(warmup)
        if len(warmup) != 2 or not all(isinstance(steps, int) and steps >= 0 for steps in warmup):
            raise TrainingConfigError(f"{where}.warmup must be two step counts >= 0 (outside the ViT, then the "
                                      f"ViT) or null, not {values.get('warmup')}")
        warmup = (warmup[0], warmup[1])
    power = float(values.get("power", EomtSchedule.power))
    if not power > 0:
        raise TrainingConfigError(f"{where}.power must be above 0, not {power}")
    total_iters = values.get("total_iters")
    if total_iters is not None and not (isinstance(total_iters, int) and total_iters > 0):
        raise TrainingConfigError(f"{where}.total_iters must be a positive int, not {total_iters}")
    return EomtSchedule(warmup, power, total_iters)
