"""Trainer checkpoints that resume on torch >= 2.6 and whose output folder the pipeline loads.

ModelScope's ``CheckpointHook`` stores ``np.random.get_state()`` (a numpy array) in the trainer state and its loader
reads it back with ``weights_only=True``, which refuses numpy arrays; its counters are off by one for checkpoints
saved at the end of an epoch (the epoch then runs its end-of-epoch hooks again on resume). The hooks here keep
ModelScope's configuration and file names (``{work_dir}/iter_N.pth`` + ``iter_N_trainer_state.pth``, or
``epoch_N``) and change what is stored:
- every rank's RNG states (``meta['rng_states']``, in rank order, gathered to rank 0, which alone writes) as plain
  Python values and tensors (``portable_rng_state``), loadable with ``weights_only=True``; on resume rank r restores
  state r. A checkpoint written before there was one state per rank holds one state (``meta['rng_state']``), read as
  rank 0's. Resumed with more ranks than saved states, rank r without a state re-seeds with seed + r (logged): its
  drop path / dropout masks then differ from the ones the saved run would have drawn;
- ``epoch`` / ``inner_iter`` / ``iter`` = where training continues (the next epoch after an end-of-epoch save);
- ``{work_dir}/output`` (``train.checkpoint.period.output_dir``) is a model directory in this package's native
  layout (``configuration.json`` + ``pytorch_model.pt``, ``demo.write_model_dir``; FastInst: the hub layout; EoMT: HF
  files and a configuration.json) that
  ``pipeline()`` loads.
Files are written to a temporary name and renamed, so a run killed while saving leaves the previous checkpoint.
"""
import logging
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from modelscope.trainers.hooks.builder import HOOKS
from modelscope.trainers.hooks.checkpoint.checkpoint_hook import BestCkptSaverHook, CheckpointHook
from modelscope.trainers.hooks.checkpoint.checkpoint_processor import CheckpointProcessor
from modelscope.trainers.hooks.checkpoint.load_checkpoint_hook import LoadCheckpointHook
from modelscope.trainers.hooks.priority import Priority
from modelscope.utils.torch_utils import set_random_seed

from modelscope_plugin.checkpoints import io as checkpoint_io
from modelscope_plugin.config import EomtConfig, FastInstConfig, OneFormerConfig
from modelscope_plugin.errors import CheckpointError
from modelscope_plugin.model_dirs.eomt import write_hub_eomt_dir
from modelscope_plugin.model_dirs.fastinst import write_hub_dir
from modelscope_plugin.model_dirs.native import write_model_dir
from modelscope_plugin.model_dirs.oneformer import write_hub_oneformer_dir
from modelscope_plugin.ranks import gather_objects, rank_and_world_size

logger = logging.getLogger(__name__)

TRAINER_STATE_SUFFIX = CheckpointProcessor.TRAINER_STATE_SUFFIX
MODEL_STATE_SUFFIX = CheckpointProcessor.MODEL_STATE_SUFFIX


def portable_rng_state() -> Dict[str, Any]:
    """Python, numpy and torch RNG states in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "random": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "cpu": torch.random.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.random.set_rng_state(state["cpu"])
    if torch.cuda.is_available() and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rank_rng(seed: int, rank: int) -> None:
    """Seeds rank ``rank``'s Python, numpy and torch (CPU and CUDA) global RNGs apart from the other ranks', so that
    the masks drawn from them in the forward (drop path, dropout) differ between ranks' images: rank r > 0 with
    seed + r (detectron2's ``seed_all_rng(seed + rank)``); rank 0 keeps the stream the trainer seeded with ``seed``
    when it was built, so one process draws what it drew before ranks were seeded apart."""
    if rank > 0:
        set_random_seed(seed + rank)


def saved_rng_states(meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """A checkpoint's RNG states in rank order: ``rng_states``, or the one state (``rng_state``) of a checkpoint
    written before there was one per rank; empty if it holds none."""
    if "rng_states" in meta:
        return list(meta["rng_states"])
    return [meta["rng_state"]] if meta.get("rng_state") is not None else []


def _atomic_save(value: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(value, temporary)
    os.replace(temporary, path)


def checkpoint_files(prefix) -> tuple:
    """(model file, trainer-state file) of a checkpoint prefix such as ``work_dir/iter_4`` (or its ``.pth``)."""
    prefix = str(prefix)
    if prefix.endswith(TRAINER_STATE_SUFFIX):
        prefix = prefix[: -len(TRAINER_STATE_SUFFIX)]
    elif prefix.endswith(MODEL_STATE_SUFFIX):
        prefix = prefix[: -len(MODEL_STATE_SUFFIX)]
    return Path(prefix + MODEL_STATE_SUFFIX), Path(prefix + TRAINER_STATE_SUFFIX)


def read_trainer_state(state_file: Path) -> Dict[str, Any]:
    """A trainer-state file's contents, or one ``CheckpointError`` if it is truncated or corrupt."""
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"trainer state {state_file} is truncated or corrupt: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer state {state_file} holds a {type(state).__name__}, not a dict")
    return state


def latest_checkpoint(work_dir) -> Optional[str]:
    """The prefix of the intact checkpoint in ``work_dir`` with the most completed iterations, or None; a checkpoint
    whose trainer state cannot be read or whose model file is not a complete torch file is skipped (logged)."""
    best, best_iter = None, -1
    for state_file in Path(work_dir).glob(f"*{TRAINER_STATE_SUFFIX}"):
        model_file, _ = checkpoint_files(state_file)
        if not model_file.is_file():
            continue
        try:
            if not zipfile.is_zipfile(model_file):
                raise CheckpointError(f"model file {model_file} is truncated or corrupt")
            meta = read_trainer_state(state_file).get("meta", {})
        except CheckpointError as error:
            logger.warning("skipping checkpoint %s: %s", str(state_file)[: -len(TRAINER_STATE_SUFFIX)], error)
            continue
        if int(meta.get("iter", -1)) > best_iter:
            best, best_iter = str(state_file)[: -len(TRAINER_STATE_SUFFIX)], int(meta.get("iter", -1))
    return best


def write_output_dir(directory: Path, config, network: torch.nn.Module,
                     logit_scale: Optional[torch.Tensor] = None) -> Path:
    """The trained network as a model directory ``pipeline()`` loads: Mask2Former in the native layout, FastInst in
    the hub layout (with its category ids and test-time preprocessing), EoMT and OneFormer as HF files beside a
    configuration.json (``model_dirs.eomt.write_hub_eomt_dir``, ``model_dirs.oneformer.write_hub_oneformer_dir``;
    ``logit_scale``: OneFormer's learned contrastive scale, saved with it)."""
    if isinstance(config, OneFormerConfig):
        return write_hub_oneformer_dir(directory, config, network, logit_scale)
    if isinstance(config, EomtConfig):
        return write_hub_eomt_dir(directory, config, network)
    if isinstance(config, FastInstConfig):
        return write_hub_dir(directory, config, network, finetuned=True)
    return write_model_dir(directory, config, network)


class SegmentationCheckpointProcessor(CheckpointProcessor):
    def prepare_output(self, trainer, output_dir):
        Path(output_dir).mkdir(parents=True, exist_ok=True)

    def save_checkpoints(self, trainer, checkpoint_path_prefix, output_dir, meta=None, save_optimizers=True):
        network = trainer.unwrap_module(trainer.model)
        model_file, state_file = checkpoint_files(checkpoint_path_prefix)
        state = {"meta": meta or {}}
        if save_optimizers:
            state["optimizer"] = trainer.optimizer.state_dict()
            if trainer.lr_scheduler is not None:
                state["lr_scheduler"] = trainer.lr_scheduler.state_dict()
        criterion = getattr(trainer, "criterion", None)
        learned = criterion is not None and any(True for _ in criterion.parameters())
        if learned:  # OneFormer's contrastive logit scale trains with the network
            state["criterion"] = criterion.state_dict()
        _atomic_save(state, state_file)
        _atomic_save({"state_dict": network.state_dict()}, model_file)
        # the logit scale learns only beside a text mapper (else it stays at its initial value, not worth saving)
        contrastive = learned and getattr(trainer.model_config, "text_mapper", None) is not None
        write_output_dir(Path(output_dir), trainer.model_config, network,
                         getattr(criterion, "logit_scale", None) if contrastive else None)

    def load_checkpoints(self, checkpoint_path_prefix, trainer, load_all_state, strict):
        model_file, state_file = checkpoint_files(checkpoint_path_prefix)
        if not model_file.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_path_prefix}: no model file {model_file}")
        network = trainer.unwrap_module(trainer.model)
        weights = checkpoint_io.extract_state_dict(checkpoint_io.read_checkpoint(model_file))
        checkpoint_io.load_strict(network, weights, checkpoint_name=str(model_file))
        if not load_all_state:
            return {}
        if not state_file.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint_path_prefix}: no trainer state {state_file} "
                                    "to resume from")
        state = read_trainer_state(state_file)
        if "criterion" in state:
            trainer.criterion.load_state_dict(state["criterion"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        if trainer.lr_scheduler is not None:
            trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return state.get("meta", {})

    def remove_checkpoints(self, trainer, checkpoint_path_prefix):
        for path in checkpoint_files(checkpoint_path_prefix):
            if path.is_file():
                path.unlink()


class _PortableStateMixin:
    """Saves after every other hook (the lr scheduler's epoch step included), with resumable counters."""

    PRIORITY = Priority.LOWEST
    _end_of_epoch = False
    _rng_states: List[Dict[str, Any]] = []  # every rank's, gathered by _do_save for _create_training_state

    def __init__(self, *arguments, **kwargs):
        super().__init__(*arguments, **kwargs)
        self.processor = SegmentationCheckpointProcessor()

    def after_train_iter(self, trainer):
        self._end_of_epoch = False
        super().after_train_iter(trainer)

    def after_train_epoch(self, trainer):
        self._end_of_epoch = True
        super().after_train_epoch(trainer)

    def _do_save(self, trainer, save_strategy):
        # every rank takes part: each one's RNG state reaches rank 0, which alone writes the checkpoint
        self._rng_states = gather_objects(portable_rng_state())
        super()._do_save(trainer, save_strategy)

    def _create_training_state(self, trainer):
        if self._end_of_epoch:  # trainer.iter already counts the epoch's last iteration
            meta = {"epoch": trainer.epoch + 1, "inner_iter": 0, "iter": trainer.iter}
        else:
            meta = {"epoch": trainer.epoch, "inner_iter": trainer.inner_iter + 1, "iter": trainer.iter + 1}
        meta["rng_states"] = self._rng_states
        index = 0
        for hook in trainer.hooks:
            if hasattr(hook, "state_dict") and getattr(hook, "_should_save", True):
                meta[f"{hook.__class__}-{index}"] = hook.state_dict()
                index += 1
        return meta


@HOOKS.register_module(module_name="SegmentationCheckpointHook", force=True)
class SegmentationCheckpointHook(_PortableStateMixin, CheckpointHook):
    """``CheckpointHook`` (same arguments) with portable, resumable state and a native model directory output."""


@HOOKS.register_module(module_name="SegmentationBestCheckpointHook", force=True)
class SegmentationBestCheckpointHook(_PortableStateMixin, BestCkptSaverHook):
    """``BestCkptSaverHook`` (same arguments) with portable, resumable state and a native model directory output."""


class SegmentationLoadCheckpointHook(LoadCheckpointHook):
    """Resumes from a checkpoint of the hooks above: weights strictly, optimizer, scheduler, counters, and this
    rank's RNG state (re-seeded with seed + rank where the checkpoint holds none for this rank)."""

    def __init__(self, *arguments, **kwargs):
        super().__init__(*arguments, **kwargs)
        self.processor = SegmentationCheckpointProcessor()
        self.reseed_with: Optional[int] = None  # the seed of a rank the checkpoint holds no RNG state for

    def before_run(self, trainer):
        self.logger = trainer.logger
        if self.checkpoint_file is None:
            return
        meta = self.load_checkpoint(self.checkpoint_file, trainer, self.load_all_state, self.strict)
        states = saved_rng_states(meta)
        rank, world_size = rank_and_world_size()
        self.rng_state = states[rank] if rank < len(states) else None
        self.reseed_with = trainer._seed + rank if states and rank >= len(states) else None
        if states and len(states) != world_size and rank == 0:
            self.logger.warning(f"{self.checkpoint_file} holds the RNG states of {len(states)} ranks, this run has "
                                f"{world_size}: rank r restores state r, a rank without one re-seeds with seed + r; "
                                "the random masks (drop path, dropout) do not continue exactly as the saved run's")
        self.need_load_rng_state = self.load_all_state

    @classmethod
    def load_checkpoint(cls, filename, trainer, load_all_state=True, strict=True):
        meta = SegmentationCheckpointProcessor().load_checkpoints(filename, trainer, load_all_state, strict)
        if load_all_state:
            cls._restore_training_state(trainer, meta)
            trainer.logger.info(f"resumed from {filename}: epoch {trainer.epoch}, iteration {trainer.iter} "
                                f"(batch {trainer.inner_iter} of the epoch)")
        return meta

    def before_train_iter(self, trainer):
        if self.need_load_rng_state and self.rng_state is not None:
            restore_rng_state(self.rng_state)
        elif self.need_load_rng_state and self.reseed_with is not None:
            set_random_seed(self.reseed_with)
        self.need_load_rng_state = False
