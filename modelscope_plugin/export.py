"""ONNX export of a network (FastInst; Mask2Former where the exporter supports its ops) with dynamic input size.

The exported graph takes the pipeline's network input, ``images`` (B, 3, H, W) normalised and zero-padded to a
multiple of 32 (``preprocessing.prepare_image``), and returns the raw ``class_logits`` (B, Q, K + 1) and
``mask_logits`` (B, Q, h, w) of the last decoder layer; post-processing stays in Python (``postprocessing.py``).
Batch, height and width are dynamic axes. The TorchScript-based exporter (``dynamo=False``) is used: it needs
only the ``onnx`` package, while torch's default dynamo exporter also needs ``onnxscript``.
"""
from pathlib import Path
from typing import Sequence, Tuple

import torch
from torch import nn


class ExportError(RuntimeError):
    """The network could not be exported, or the exported graph disagrees with the network."""


class LogitsOnly(nn.Module):
    """Wraps a network whose output dataclass has ``class_logits`` and ``mask_logits``; returns the two tensors."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        output = self.network(images)
        return output.class_logits, output.mask_logits


def export_onnx(network: nn.Module, path, example_size: Tuple[int, int] = (640, 640), opset: int = 17) -> Path:
    """Writes ``network`` (in eval mode) to ``path`` as ONNX with dynamic batch, height and width.

    ``example_size`` is the (height, width) traced; it must be a multiple of 32 (and, for FastInst, large enough
    that the stride-16 map holds at least as many pixels as queries). An existing file at ``path`` is refused."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose another output path (nothing is overwritten)")
    if any(side % 32 for side in example_size):
        raise ValueError(f"example_size {example_size} must be multiples of 32 (the network's padded input)")
    was_training = network.training
    network.eval()
    example = torch.zeros(1, 3, *example_size, device=next(network.parameters()).device)
    try:
        with torch.no_grad():
            torch.onnx.export(
                LogitsOnly(network), (example,), str(path), dynamo=False, opset_version=opset,
                input_names=["images"], output_names=["class_logits", "mask_logits"],
                dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "class_logits": {0: "batch"},
                              "mask_logits": {0: "batch", 2: "mask_height", 3: "mask_width"}},
            )
    except Exception as error:  # the exporter raises many types (SymbolicValueError, RuntimeError, ...)
        if path.exists():
            path.unlink()
        raise ExportError(f"ONNX export of {type(network).__name__} failed: {type(error).__name__}: {error}") from error
    finally:
        network.train(was_training)
    return path


def check_onnx(network: nn.Module, path, sizes: Sequence[Tuple[int, int]] = ((640, 640), (480, 832)),
               tolerance: float = 1e-4, seed: int = 0) -> float:
    """Runs the ONNX file with onnxruntime on random inputs of each (height, width) and compares its logits with the
    network's; returns the largest absolute difference, raising ``ExportError`` above ``tolerance``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    network.eval()
    largest = 0.0
    for height, width in sizes:
        images = torch.randn(1, 3, height, width, generator=generator)
        with torch.no_grad():
            output = network(images)
        class_logits, mask_logits = session.run(None, {"images": images.numpy()})
        for name, ours, theirs in (("class_logits", output.class_logits, class_logits), ("mask_logits", output.mask_logits, mask_logits)):
            if tuple(theirs.shape) != tuple(ours.shape):
                raise ExportError(f"{path}: {name} has shape {theirs.shape} at input {height}x{width}, the network {tuple(ours.shape)}")
            difference = float((torch.from_numpy(theirs) - ours).abs().max())
            largest = max(largest, difference)
            if difference > tolerance:
                raise ExportError(f"{path}: {name} differs from the network by {difference:.3g} at input {height}x{width}")
    return largest
