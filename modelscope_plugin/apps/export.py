"""ONNX export of a network: FastInst with dynamic input size, Mask2Former, OneFormer (one task) and EoMT at one
fixed input size.

The exported graph takes the pipeline's network input, ``images`` (B, 3, H, W) normalised and zero-padded to a
multiple of 32 (``preprocessing.prepare_image``), and returns the raw ``class_logits`` (B, Q, K + 1) and
``mask_logits`` (B, Q, h, w) of the last decoder layer; post-processing stays in Python (``postprocessing.py``).

- FastInst: batch, height and width are dynamic axes, through the TorchScript-based exporter (``dynamo=False``),
  which needs only the ``onnx`` package.
- Mask2Former: Swin's per-stage window padding and shifted-window mask and the deformable attention's level
  shapes are Python integers computed from the input size, which both exporters bake into the graph (the
  TorchScript one even inconsistently: its Swin graph fails at the traced size), so the graph is exported for the
  traced (1, 3, H, W) only, with torch's dynamo exporter (needs ``onnxscript``). Pad images to that size (zeros at
  the bottom and right, as ``prepare_image`` pads; the logits then depend on the canvas, as with any padding) and
  crop the masks to the resized image before post-processing.
- OneFormer: as Mask2Former, for one task: the task is a network input whose tokens are constants, so the chosen
  task's query is baked into the graph (recorded in the model's metadata as ``task``); export one graph per task.
- EoMT: the square input its position embeddings (or rotary tables) were made for, ``image_size`` x ``image_size``,
  and no other, through the dynamo exporter. The graph is the network as it runs in inference: blocks whose
  masked-attention probability is below 0.5 (every trained checkpoint's) unmasked, the others masked.
"""
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from modelscope_plugin.config import TASKS
from modelscope_plugin.errors import ExportError, TaskError


class LogitsOnly(nn.Module):
    """Wraps a network whose output dataclass has ``class_logits`` and ``mask_logits``; returns the two tensors."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        output = self.network(images)
        return output.class_logits, output.mask_logits


class OneFormerLogitsOnly(LogitsOnly):
    """``LogitsOnly`` for OneFormer told one task (a graph constant)."""

    def __init__(self, network: nn.Module, task: str):
        super().__init__(network)
        self.task = task

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        output = self.network(images, self.task)
        return output.class_logits, output.mask_logits


class EomtLogitsOnly(LogitsOnly):
    """``LogitsOnly`` for EoMT with its masked-attention decisions fixed when wrapped (graph constants)."""

    def __init__(self, network: nn.Module):
        super().__init__(network)
        self.masked_blocks = network.masked_blocks()

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        output = self.network(images, masked_blocks=self.masked_blocks)
        return output.class_logits, output.mask_logits


def has_dynamic_input_size(network: nn.Module) -> bool:
    """Whether ``network`` exports with dynamic height and width (FastInst) or at a fixed size (Mask2Former)."""
    from modelscope_plugin.modeling.fastinst.model import FastInst

    return isinstance(network, FastInst)


def fixed_input_size(network: nn.Module) -> Optional[Tuple[int, int]]:
    """The only (height, width) ``network`` accepts (EoMT's square input), or None where it takes any padded size."""
    from modelscope_plugin.modeling.eomt.model import Eomt

    if isinstance(network, Eomt):
        side = network.embeddings.grid_size * network.embeddings.patch_projection.stride[0]
        return side, side
    return None


def is_task_conditioned(network: nn.Module) -> bool:
    """Whether ``network`` takes the task as an input (OneFormer)."""
    from modelscope_plugin.modeling.oneformer.model import OneFormer

    return isinstance(network, OneFormer)


def export_onnx(network: nn.Module, path, example_size: Optional[Tuple[int, int]] = None, opset: int = 18,
                task: Optional[str] = None) -> Path:
    """Writes ``network`` (in eval mode) to ``path`` as ONNX: dynamic batch, height and width for FastInst, the
    (1, 3, *example_size) input only for Mask2Former, OneFormer and EoMT (see the module docstring).

    ``example_size`` is the (height, width) traced (default: EoMT's input size, else 640 x 640); it must be a
    multiple of 32 (and, for FastInst, large enough that the stride-16 map holds at least as many pixels as
    queries; for EoMT, its input size). ``task``: OneFormer's task, baked into the graph (required there, refused
    for the other networks, whose logits do not depend on it). An existing file at ``path`` is refused."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose another output path (nothing is overwritten)")
    if is_task_conditioned(network) != (task is not None):
        raise ExportError(f"{type(network).__name__}: " + (
            "the task is a network input; choose the one to bake into the graph (panoptic, semantic or instance)"
            if task is None else f"task {task!r} given, but the network's logits do not depend on the task"))
    if task is not None and task not in TASKS:
        raise TaskError(f"task must be one of {TASKS}, got {task!r}")
    fixed_size = fixed_input_size(network)
    if example_size is None:
        example_size = fixed_size or (640, 640)
    if fixed_size is not None and tuple(example_size) != fixed_size:
        raise ExportError(f"example_size {tuple(example_size)} is not the {fixed_size[0]}x{fixed_size[1]} input "
                          f"{type(network).__name__} was made for (its only input size)")
    if any(side % 32 for side in example_size):
        raise ValueError(f"example_size {example_size} must be multiples of 32 (the network's padded input)")
    was_training = network.training
    network.eval()
    example = torch.zeros(1, 3, *example_size, device=next(network.parameters()).device)
    if task is not None:
        wrapper = OneFormerLogitsOnly(network, task).eval()
    else:
        wrapper = (EomtLogitsOnly(network) if fixed_size is not None else LogitsOnly(network)).eval()
    names = dict(input_names=["images"], output_names=["class_logits", "mask_logits"])
    try:
        with torch.no_grad():
            if has_dynamic_input_size(network):
                torch.onnx.export(
                    wrapper, (example,), str(path), dynamo=False, opset_version=min(opset, 17), **names,
                    dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "class_logits": {0: "batch"},
                                  "mask_logits": {0: "batch", 2: "mask_height", 3: "mask_width"}})
            else:
                # the weights inside the one file (protobuf's 2 GB cap is far above these networks), so that the
                # file can be renamed and nothing is left beside it
                torch.onnx.export(wrapper, (example,), str(path), dynamo=True, opset_version=opset,
                                  external_data=False, verbose=False, **names)
        if task is not None:
            record_task(path, task)
    except Exception as error:  # the exporters raise many types (SymbolicValueError, TorchExportError, ...)
        remove_onnx(path)
        raise ExportError(f"ONNX export of {type(network).__name__} failed: {type(error).__name__}: {error}") from error
    finally:
        network.train(was_training)
    return path


def record_task(path: Path, task: str) -> None:
    """Writes ``task`` into the ONNX model's metadata (``metadata_props``)."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"task": task})
    onnx.save(model, str(path))


def onnx_task(session) -> Optional[str]:
    """The task baked into an onnxruntime session's graph (OneFormer), or None."""
    return session.get_modelmeta().custom_metadata_map.get("task")


def remove_onnx(path) -> None:
    """Deletes an ONNX file and any external-data file (``<name>.data``) an exporter wrote beside it."""
    path = Path(path)
    for leftover in (path, path.with_name(path.name + ".data")):
        if leftover.exists():
            leftover.unlink()


def onnx_input_size(session) -> Optional[Tuple[int, int]]:
    """The fixed (height, width) of an onnxruntime session's ``images`` input, or None where they are dynamic."""
    height, width = session.get_inputs()[0].shape[2:]
    return (height, width) if isinstance(height, int) and isinstance(width, int) else None


def check_onnx(network: nn.Module, path, sizes: Sequence[Tuple[int, int]] = ((640, 640), (480, 832)),
               tolerance: float = 1e-4, seed: int = 0) -> float:
    """Runs the ONNX file with onnxruntime on random inputs of each (height, width) (of its fixed size only, for a
    fixed-size graph) and compares its logits with the network's; returns the largest difference relative to the
    logit range (``max(1, largest |logit|)``, as the parity tests measure: deep networks amplify float32 rounding in
    proportion to their logits), raising ``ExportError`` above ``tolerance``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fixed_size = onnx_input_size(session)
    if fixed_size is not None:  # a fixed-size graph (Mask2Former) is checked at its own size only
        sizes = [fixed_size]
    task = onnx_task(session)
    if is_task_conditioned(network) and task is None:
        raise ExportError(f"{path}: no task in the graph's metadata; OneFormer's logits depend on it")
    arguments = (task,) if is_task_conditioned(network) else ()
    generator = torch.Generator().manual_seed(seed)
    network.eval()
    largest = 0.0
    for height, width in sizes:
        images = torch.randn(1, 3, height, width, generator=generator)
        with torch.no_grad():
            output = network(images, *arguments)
        class_logits, mask_logits = session.run(None, {"images": images.numpy()})
        for name, ours, theirs in (("class_logits", output.class_logits, class_logits),
                                   ("mask_logits", output.mask_logits, mask_logits)):
            if tuple(theirs.shape) != tuple(ours.shape):
                raise ExportError(f"{path}: {name} has shape {theirs.shape} at input {height}x{width}, the network "
                                  f"{tuple(ours.shape)}")
            logit_range = max(1.0, float(ours.abs().max()))
            difference = float((torch.from_numpy(theirs) - ours).abs().max())
            largest = max(largest, difference / logit_range)
            if difference > tolerance * logit_range:
                raise ExportError(f"{path}: {name} differs from the network by {difference:.3g} at input "
                                  f"{height}x{width}, {difference / logit_range:.3g} of the logit range "
                                  f"{logit_range:.3g} (tolerance {tolerance:.3g})")
    return largest
