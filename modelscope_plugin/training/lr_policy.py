"""Learning-rate policies as EasyCV / mmcv configurations write them (``lr_config`` / ``train.lr_scheduler``):
``{policy: step | poly | cosine | fixed, by_epoch, warmup, warmup_iters, warmup_ratio, warmup_by_epoch, ...}``.

mmcv's ``LrUpdaterHook`` sets the learning rate of iteration ``i`` (0-based) before it runs:

- regular lr: progress p = the epoch of iteration i (``by_epoch``) or i itself, P = the run's epochs or iterations;
  ``step``: base * gamma ** (number of milestones <= p) (an int step s: p // s), clipped below at ``min_lr``;
  ``poly``: (base - min_lr) * (1 - p / P) ** power + min_lr;
  ``cosine`` (mmcv's ``CosineAnnealing``): target + (base - target) * (cos(pi * p / P) + 1) / 2, target = ``min_lr``
  or base * ``min_lr_ratio``; ``fixed``: base.
- warmup, for i < warmup_iters (``warmup_by_epoch``: warmup_iters counts epochs): ``constant``: regular * ratio;
  ``linear``: regular * (1 - (1 - i / warmup_iters) * (1 - ratio)); ``exp``: regular * ratio ** (1 - i / warmup_iters).

``PolicyLR`` is a torch scheduler stepped once per iteration (ModelScope's ``LrSchedulerHook`` with ``by_epoch``
false) whose ``last_epoch`` is the iteration about to run, so it resumes from a checkpoint like any scheduler.
"""
import math
from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Sequence, Union

import torch

from modelscope_plugin.errors import TrainingConfigError

POLICIES = ("step", "poly", "cosine", "fixed")
# mmcv's class-name spellings of the same policies (``<Policy>LrUpdaterHook``)
POLICY_ALIASES = {"Step": "step", "Poly": "poly", "CosineAnnealing": "cosine", "Fixed": "fixed"}
WARMUPS = ("constant", "linear", "exp")


@dataclass
class LrPolicyConfig:
    policy: str
    by_epoch: bool = True
    """The regular lr changes per epoch (True) or per iteration (False); warmup is always per iteration."""
    warmup: Optional[str] = None
    warmup_iters: int = 0
    warmup_ratio: float = 0.1
    warmup_by_epoch: bool = False
    """``warmup_iters`` counts epochs."""
    step: Union[int, Sequence[int], None] = None
    """``step``: a list of milestones or an interval."""
    gamma: float = 0.1
    power: float = 1.0
    min_lr: Optional[float] = None
    """``step``: none; ``poly``: 0; ``cosine``: this or ``min_lr_ratio``."""
    min_lr_ratio: Optional[float] = None


def lr_policy_from(values: Mapping[str, Any], where: str = "train.lr_scheduler") -> LrPolicyConfig:
    """An ``LrPolicyConfig`` from a config mapping; one ``TrainingConfigError`` naming every unknown key and bad
    value."""
    values = dict(values)
    known = {field.name for field in fields(LrPolicyConfig)}
    problems = []
    unknown = sorted(set(values) - known)
    if unknown:
        problems.append(f"unknown keys {unknown} (known: {sorted(known)})")
    policy = POLICY_ALIASES.get(values.get("policy"), values.get("policy"))
    if policy not in POLICIES:
        problems.append(f"policy {values.get('policy')!r} is not one of {list(POLICIES)}")
    warmup = values.get("warmup")
    if warmup is not None and warmup not in WARMUPS:
        problems.append(f"warmup {warmup!r} is not one of {list(WARMUPS)} or null")
    if warmup is not None and not int(values.get("warmup_iters", 0)) > 0:
        problems.append(f"warmup_iters must be a positive integer with warmup {warmup!r}")
    if warmup is not None and not 0 < float(values.get("warmup_ratio", 0.1)) <= 1:
        problems.append(f"warmup_ratio {values.get('warmup_ratio')} is not in (0, 1]")
    step = values.get("step")
    if policy == "step" and not (isinstance(step, int) and step > 0 or isinstance(step, (list, tuple)) and step
                                 and all(isinstance(s, int) and s > 0 for s in step)):
        problems.append(f"step policy needs step: a positive int or a list of positive ints, got {step!r}")
    if policy == "cosine" and (values.get("min_lr") is None) == (values.get("min_lr_ratio") is None):
        problems.append("cosine policy needs exactly one of min_lr, min_lr_ratio")
    if problems:
        raise TrainingConfigError(f"{where}: " + "; ".join(problems))
    values["policy"] = policy
    if isinstance(step, (list, tuple)):
        values["step"] = tuple(step)
    if policy == "poly" and values.get("min_lr") is None:
        values["min_lr"] = 0.0
    return LrPolicyConfig(**values)


def regular_lr(config: LrPolicyConfig, base_lr: float, progress: int, max_progress: int) -> float:
    """The policy's lr at ``progress`` of ``max_progress`` (epochs or iterations), without warmup."""
    if config.policy == "step":
        if isinstance(config.step, int):
            exponent = progress // config.step
        else:
            exponent = sum(1 for milestone in config.step if progress >= milestone)
        lr = base_lr * config.gamma ** exponent
        return max(lr, config.min_lr) if config.min_lr is not None else lr
    if config.policy == "poly":
        return (base_lr - config.min_lr) * (1 - progress / max_progress) ** config.power + config.min_lr
    if config.policy == "cosine":
        target = base_lr * config.min_lr_ratio if config.min_lr_ratio is not None else config.min_lr
        return target + 0.5 * (base_lr - target) * (math.cos(math.pi * progress / max_progress) + 1)
    return base_lr


def warmup_factor(config: LrPolicyConfig, iteration: int, warmup_iterations: int) -> float:
    """The factor warmup multiplies the regular lr of ``iteration`` with (1 after the warmup)."""
    if config.warmup is None or iteration >= warmup_iterations:
        return 1.0
    if config.warmup == "constant":
        return config.warmup_ratio
    if config.warmup == "linear":
        return 1 - (1 - iteration / warmup_iterations) * (1 - config.warmup_ratio)
    return config.warmup_ratio ** (1 - iteration / warmup_iterations)


def policy_lr(config: LrPolicyConfig, base_lr: float, iteration: int, iterations_per_epoch: int,
              max_epochs: int) -> float:
    """The lr of ``iteration`` (0-based) in a run of ``max_epochs`` epochs of ``iterations_per_epoch``."""
    if config.by_epoch:
        progress, max_progress = iteration // iterations_per_epoch, max_epochs
    else:
        progress, max_progress = iteration, max_epochs * iterations_per_epoch
    warmup_iterations = config.warmup_iters * (iterations_per_epoch if config.warmup_by_epoch else 1)
    return regular_lr(config, base_lr, progress, max_progress) * warmup_factor(config, iteration, warmup_iterations)


class PolicyLR(torch.optim.lr_scheduler.LRScheduler):
    """``policy_lr`` for every parameter group (each from its own initial lr); step once per iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: LrPolicyConfig, iterations_per_epoch: int,
                 max_epochs: int, last_epoch: int = -1):
        if iterations_per_epoch < 1:
            raise TrainingConfigError(f"an lr policy needs at least one iteration per epoch, got "
                                      f"{iterations_per_epoch}")
        self.config = config
        self.iterations_per_epoch = iterations_per_epoch
        self.max_epochs = max_epochs
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> List[float]:
        return [policy_lr(self.config, base_lr, self.last_epoch, self.iterations_per_epoch, self.max_epochs)
                for base_lr in self.base_lrs]

    def state_dict(self):
        """The counters only (plain values a ``weights_only`` load accepts); the run's configuration decides the
        policy."""
        state = super().state_dict()
        state.pop("config")
        return state
