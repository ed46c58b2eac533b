"""bf16 audit (issue 28, item 1): which FLOPs and bytes of the bf16 pipeline run in bfloat16, and which in float32.

    .venv-oracle/bin/python benchmarks/bf16_audit.py                       # all models, audit + agreement
    .venv-oracle/bin/python benchmarks/bf16_audit.py --models mask2former-r50 --images 1

Each network is built with the shaped random weights the other benchmarks use (``gpu_check.build_model``:
Mask2Former Swin-L / R50 with tests/oracles/hf_oracle.py's weights when transformers is importable, FastInst R50-D3
shaped and calibrated; EoMT-L, or EoMT at ViT-B widths, with the builder's random initialisation) and one COCO image
goes through exactly what ``Predictor(precision="bf16")`` does: ``run`` (inference mode + bf16 autocast) then
``postprocess``, under ``DtypeAudit``, a ``TorchDispatchMode`` that sees every aten op after autocast has cast its
inputs (composite ops such as linear or einsum are split by their own kernels, with autocast as the caller had it,
so that their matrix products are seen). Per op, module and input dtype it records the FLOPs of matrix products
(mm, addmm, bmm, baddbmm, convolution, SDPA: torch's ``flop_counter`` formulas) and the bytes read and written by
every other op. It prints the bf16 / fp32 shares of the matrix FLOPs, the largest fp32 matrix products with the
module that ran them, the largest fp32 memory-bound ops (layer / group norm, softmax, gather, GELU, upsampling, ...)
and the dtype conversions (``aten._to_copy``).

On a CPU without native bf16 units (AVX2) oneDNN's bf16 matrix products run in reference loops, 100-300x slower
than fp32 (a Swin-L forward would take over an hour), so there the audit *emulates* them: a bf16 matrix product
runs on its bf16 operands widened to fp32 (exact) and its result is rounded to bf16, which is what AMX / AVX-512
BF16 kernels compute (bf16 products, fp32 accumulation, bf16 result) up to the order of the sums. Every other op
runs as it would. The FLOP and dtype accounting does not depend on the emulation; the pixel agreement with fp32 is
measured on the emulated products (``--emulate no`` runs the real kernels).

Pixel agreement: for each image, fp32 ``Predictor`` vs bf16 ``Predictor``, the fraction of pixels that have the
same class (or none) in both label maps, and the fraction that also lie in matching instances (segments paired
by intersection over union > 0.5).
"""
import argparse
import collections
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

REPOSITORY = Path(__file__).resolve().parents[1]
IMAGES = [REPOSITORY.parent / "shared" / "data" / "coco" / "val2017" / name
          for name in ("000000439180.jpg", "000000039769.png", "000000142238.jpg")]
MODEL_NAMES = ("mask2former-swin-l", "mask2former-r50", "fastinst-r50-d3", "eomt-b", "eomt-l")
aten = torch.ops.aten
COMPOSITE = torch._C.DispatchKey.CompositeImplicitAutograd
AUTOCAST_KEYS = {"cpu": torch._C.DispatchKey.AutocastCPU, "cuda": torch._C.DispatchKey.AutocastCUDA}


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """(B, heads, L, E) x (B, heads, S, E) -> scores, then (B, heads, L, S) x (B, heads, S, Ev)."""
    *batch, query_length, embed = query_shape
    key_length, value_embed = key_shape[-2], value_shape[-1]
    batch_size = int(np.prod(batch))
    return 2 * batch_size * query_length * key_length * (embed + value_embed)


def matrix_flops(func, args, kwargs, output) -> Optional[int]:
    """FLOPs of a matrix product or convolution (None: not one)."""
    packet = func.overloadpacket
    if packet in (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_attention_math,
                  aten._scaled_dot_product_fused_attention_overrideable):
        return attention_flops(args[0].shape, args[1].shape, args[2].shape)
    if packet in FUSED_LINEAR_OPS:  # (input (..., in), weight (out, in), bias, ...): a linear layer
        return 2 * args[0].numel() * args[1].shape[0]
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=output))
    return None


# oneDNN's linear + activation (modelscope_plugin.modeling.layers.cpu_bf16.linear_gelu), where this torch build has it
FUSED_LINEAR_OPS = {torch.ops.mkldnn._linear_pointwise} if hasattr(torch.ops.mkldnn, "_linear_pointwise") else set()
MATRIX_OPS = set(flop_registry) | FUSED_LINEAR_OPS | {aten._scaled_dot_product_flash_attention_for_cpu,
                                                      aten._scaled_dot_product_attention_math,
                                                      aten._scaled_dot_product_fused_attention_overrideable}
# ops that only reshape or alias: no bytes moved
VIEW_OPS = {aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.permute, aten.transpose, aten.t,
            aten.unsqueeze, aten.squeeze, aten.select, aten.slice, aten.split, aten.split_with_sizes, aten.unbind,
            aten.as_strided, aten.alias, aten.detach, aten.chunk, aten.narrow, aten.unflatten, aten.flatten,
            aten.view_as_real, aten.lift_fresh, aten.sym_size, aten.sym_stride, aten.sym_numel, aten.dim,
            aten.is_contiguous, aten.stride, aten.size}


def floating_dtypes(values) -> List[torch.dtype]:
    dtypes: List[torch.dtype] = []
    tree_map(lambda value: dtypes.append(value.dtype)
             if isinstance(value, torch.Tensor) and value.is_floating_point() else None, values)
    return dtypes


def dtype_label(dtypes: List[torch.dtype]) -> str:
    """"bf16", "fp32", "mixed" (bf16 and fp32 inputs, e.g. a bf16 activation with fp32 norm weights) or "other"."""
    kinds = {{torch.bfloat16: "bf16", torch.float32: "fp32"}.get(dtype, "other") for dtype in dtypes}
    if kinds == {"bf16", "fp32"}:
        return "mixed"
    return next(iter(kinds)) if len(kinds) == 1 else ("other" if kinds else "none")


def tensor_bytes(values) -> int:
    total = [0]
    tree_map(lambda value: total.__setitem__(0, total[0] + value.numel() * value.element_size())
             if isinstance(value, torch.Tensor) else None, values)
    return total[0]


def module_pattern(name: str) -> str:
    """``pixel_decoder.encoder.layers.3.self_attn`` -> ``pixel_decoder.encoder.layers.*.self_attn``."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", name) or "(network)"


@dataclasses.dataclass
class OpTotals:
    calls: int = 0
    flops: int = 0
    bytes: int = 0


class AutocastWatch(TorchFunctionMode):
    """Notes at every torch function call which devices autocast is on for: inside a dispatch mode the dispatcher
    reports autocast as off."""

    def __init__(self):
        super().__init__()
        self.enabled_devices: List[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.enabled_devices = [device for device in AUTOCAST_KEYS if torch.is_autocast_enabled(device)]
        return func(*args, **(kwargs or {}))


class DtypeAudit(TorchDispatchMode):
    """Records, for every aten op below autocast, its FLOPs (matrix products) or bytes moved (other ops), keyed by
    (phase, op, input dtype label, module pattern); conversions separately, keyed by (source, target) dtype.

    ``modules``: the network whose forward hooks name the running module; ``emulate_bf16``: run bf16 matrix products
    on fp32-widened operands and round the result to bf16 (see the module docstring)."""

    def __init__(self, network: Optional[torch.nn.Module] = None, emulate_bf16: bool = False):
        super().__init__()
        self.emulate_bf16 = emulate_bf16
        self.phase = "forward"
        self.totals: Dict[Tuple[str, str, str, str], OpTotals] = collections.defaultdict(OpTotals)
        self.conversions: Dict[Tuple[str, str, str], OpTotals] = collections.defaultdict(OpTotals)
        self.module_stack: List[str] = []
        self.autocast_watch = AutocastWatch()
        self.hook_handles = []
        if network is not None:
            for name, module in network.named_modules():
                self.hook_handles.append(module.register_forward_pre_hook(self._enter(name)))
                self.hook_handles.append(module.register_forward_hook(self._leave))

    def __enter__(self):
        self.autocast_watch.__enter__()
        return super().__enter__()

    def __exit__(self, *exception):
        super().__exit__(*exception)
        return self.autocast_watch.__exit__(*exception)

    def _enter(self, name: str) -> Callable:
        def hook(module, inputs):
            self.module_stack.append(name)
        return hook

    def _leave(self, module, inputs, output):
        self.module_stack.pop()

    def remove_hooks(self) -> None:
        for handle in self.hook_handles:
            handle.remove()

    def current_module(self) -> str:
        if self.module_stack:
            return module_pattern(self.module_stack[-1])
        frame = sys._getframe(2)
        while frame is not None:  # outside the network: the innermost function of this package
            if "modelscope_plugin" in frame.f_code.co_filename:
                return f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}"
            frame = frame.f_back
        return "(outside)"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet not in MATRIX_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), COMPOSITE):
            # a composite op (linear, conv2d, matmul, einsum, layer_norm, ...) reaches the mode before it is split
            # into the ops that do the work; split it here with its own C++ kernel (not a Python decomposition,
            # which may compute differently), so that those ops are recorded
            return self.run_composite(func, args, kwargs)
        input_dtypes = floating_dtypes((args, kwargs))
        label = dtype_label(input_dtypes)
        if packet in MATRIX_OPS and self.emulate_bf16 and label == "bf16":
            widened_args, widened_kwargs = tree_map(
                lambda value: value.float() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16
                else value, (args, kwargs))
            output = func(*widened_args, **widened_kwargs)
            if isinstance(output, torch.Tensor):
                output = output.to(torch.bfloat16)
            else:  # SDPA: (output, log-sum-exp, ...): only the output is bf16
                output = (output[0].to(torch.bfloat16),) + tuple(output[1:])
        else:
            output = func(*args, **kwargs)
        if packet in VIEW_OPS:
            return output
        module = self.current_module()
        if packet in (aten._to_copy, aten.to, aten.copy_) and input_dtypes:
            output_dtypes = floating_dtypes(output)
            if output_dtypes and output_dtypes[0] != input_dtypes[0]:
                entry = self.conversions[(self.phase, str(input_dtypes[0]).replace("torch.", ""),
                                          str(output_dtypes[0]).replace("torch.", ""))]
                entry.calls += 1
                entry.bytes += tensor_bytes(args[0]) + tensor_bytes(output)
                return output
        entry = self.totals[(self.phase, str(packet).replace("aten.", ""), label, module)]
        entry.calls += 1
        flops = matrix_flops(func, args, kwargs, output) if packet in MATRIX_OPS else None
        if flops is not None:
            entry.flops += flops
        else:
            entry.bytes += tensor_bytes((args, kwargs)) + tensor_bytes(output)
        return output

    def run_composite(self, func, args, kwargs):
        """``func``'s composite kernel under this mode, with autocast as the caller has it: the dispatcher turns
        autocast off while a Python mode runs, and the parts of a composite op (einsum's bmm) are cast by it."""
        autocast_keys = [AUTOCAST_KEYS[device] for device in self.autocast_watch.enabled_devices]
        excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(key) for key in autocast_keys]
        for key in autocast_keys:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        TorchDispatchMode.__enter__(self)  # this mode again (not the watch) for the parts
        try:
            return func._op_dk(COMPOSITE, *args, **kwargs)
        finally:
            TorchDispatchMode.__exit__(self, None, None, None)
            for key, was_excluded in zip(autocast_keys, excluded):
                torch._C._dispatch_tls_set_dispatch_key_excluded(key, was_excluded)

    # ---- summaries -----------------------------------------------------------------------------------------
    def matrix_flops_by_dtype(self, phase: Optional[str] = None) -> Dict[str, int]:
        shares: Dict[str, int] = collections.Counter()
        for (entry_phase, _, label, _), totals in self.totals.items():
            if totals.flops and (phase is None or entry_phase == phase):
                shares[label] += totals.flops
        return dict(shares)

    def bf16_matrix_share(self, phase: Optional[str] = None) -> float:
        shares = self.matrix_flops_by_dtype(phase)
        total = sum(shares.values())
        return shares.get("bf16", 0) / total if total else 0.0

    def summary(self) -> Dict[str, Any]:
        matrix_rows, memory_rows = [], []
        for (phase, op, label, module), totals in self.totals.items():
            row = {"phase": phase, "op": op, "dtype": label, "module": module, "calls": totals.calls}
            if totals.flops:
                matrix_rows.append({**row, "gflop": totals.flops / 1e9})
            elif totals.bytes:
                memory_rows.append({**row, "mib": totals.bytes / 2 ** 20})
        memory_by_dtype = collections.Counter()
        for row in memory_rows:
            memory_by_dtype[row["dtype"]] += row["mib"]
        return {
            "matrix_gflop_by_dtype": {label: flops / 1e9 for label, flops in self.matrix_flops_by_dtype().items()},
            "matrix_gflop_by_dtype_forward": {
                label: flops / 1e9 for label, flops in self.matrix_flops_by_dtype("forward").items()},
            "bf16_matrix_share": self.bf16_matrix_share(),
            "memory_mib_by_dtype": dict(memory_by_dtype),
            "top_fp32_matrix": sorted((row for row in matrix_rows if row["dtype"] != "bf16"),
                                      key=lambda row: -row["gflop"])[:12],
            "top_fp32_memory": sorted((row for row in memory_rows if row["dtype"] in ("fp32", "mixed")),
                                      key=lambda row: -row["mib"])[:16],
            "conversions": [{"phase": phase, "source": source, "target": target, "calls": totals.calls,
                             "mib": totals.bytes / 2 ** 20}
                            for (phase, source, target), totals in sorted(self.conversions.items())],
        }


def print_summary(name: str, summary: Dict[str, Any]) -> None:
    matrix = summary["matrix_gflop_by_dtype"]
    total = sum(matrix.values())
    print(f"\n== {name}: matrix products {total:.1f} GFLOP: "
          + ", ".join(f"{label} {gflop:.2f} ({gflop / total:.2%})" for label, gflop in sorted(matrix.items()))
          + f"; bf16 share {summary['bf16_matrix_share']:.4f}")
    memory = summary["memory_mib_by_dtype"]
    print("   other ops, MiB read + written: "
          + ", ".join(f"{label} {mib:.0f}" for label, mib in sorted(memory.items())))
    print("   largest non-bf16 matrix products:")
    for row in summary["top_fp32_matrix"]:
        print(f"     {row['gflop']:9.3f} GFLOP {row['dtype']:5s} {row['op']:42s} x{row['calls']:<4d} "
              f"{row['phase']:11s} {row['module']}")
    print("   largest fp32 / mixed memory-bound ops:")
    for row in summary["top_fp32_memory"]:
        print(f"     {row['mib']:9.1f} MiB   {row['dtype']:5s} {row['op']:42s} x{row['calls']:<4d} "
              f"{row['phase']:11s} {row['module']}")
    print("   dtype conversions (aten._to_copy / copy_):")
    for row in summary["conversions"]:
        print(f"     {row['phase']:11s} {row['source']:>9s} -> {row['target']:9s} x{row['calls']:<5d} "
              f"{row['mib']:9.1f} MiB")


# ---- models and agreement ----------------------------------------------------------------------------------
def build(name: str, image: np.ndarray):
    """(config, network) with the benchmarks' shaped random weights, at the model card's input."""
    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    import gpu_check  # noqa: F401  (loads the package without ModelScope, as on a GPU machine)

    if name.startswith("eomt"):
        from modelscope_plugin.builders import build_eomt
        from modelscope_plugin.config import eomt_large_coco_panoptic

        config = eomt_large_coco_panoptic()
        if name == "eomt-b":  # ViT-B dimensions, at the same 640 input
            config = dataclasses.replace(config, hidden_dim=768, num_layers=12, num_heads=12, mlp_dim=3072)
        config.class_names = tuple(f"class_{index}" for index in range(config.num_classes))
        config.category_ids = tuple(range(1, config.num_classes + 1))
        torch.manual_seed(0)
        return config, build_eomt(config).eval()
    weights = "hf-oracle" if gpu_check.transformers_importable() else "demo"
    config, network, _, _ = gpu_check.build_model(name, None, weights, image)
    return config, network


def segment_map(result: Dict[str, Any], size) -> Tuple[np.ndarray, List[int]]:
    """(H, W) index of the segment covering each pixel (-1: none; instance: the highest score wins), and each
    segment's label id."""
    segments = np.full(size, -1, dtype=np.int64)
    if "panoptic_seg" in result:
        labels = []
        for index, segment in enumerate(result["segments_info"]):
            segments[result["panoptic_seg"] == segment["id"]] = index
            labels.append(segment["label_id"])
        return segments, labels
    for index in np.argsort(result["scores"], kind="stable"):
        segments[result["masks"][index].astype(bool)] = index
    return segments, list(result["label_ids"])


def agreement(result: Dict[str, Any], reference: Dict[str, Any], size) -> Dict[str, float]:
    """Fraction of pixels with the same class (or none) in both; and of those also in matching instances (each
    segment paired with the reference segment it overlaps with IoU > 0.5)."""
    ours, our_labels = segment_map(result, size)
    theirs, their_labels = segment_map(reference, size)
    our_classes = np.where(ours >= 0, np.array(our_labels + [-1])[ours], -1)
    their_classes = np.where(theirs >= 0, np.array(their_labels + [-1])[theirs], -1)
    same_class = our_classes == their_classes
    # pair segments by IoU > 0.5 (such a pairing is unique)
    pairs = {}
    our_areas = np.bincount(ours[ours >= 0], minlength=len(our_labels))
    their_areas = np.bincount(theirs[theirs >= 0], minlength=len(their_labels))
    both = (ours >= 0) & (theirs >= 0)
    joint = collections.Counter(zip(ours[both].tolist(), theirs[both].tolist()))
    for (our_index, their_index), intersection in joint.items():
        union = our_areas[our_index] + their_areas[their_index] - intersection
        if intersection / union > 0.5:
            pairs[our_index] = their_index
    paired = np.array([pairs.get(index, -2) for index in range(len(our_labels))] + [-1])
    same_instance = same_class & (np.where(ours >= 0, paired[ours], -1) == theirs)
    return {"class": float(same_class.mean()), "instance": float(same_instance.mean()),
            "segments": len(their_labels), "segments_bf16": len(our_labels)}


def audit_model(name: str, image_paths: List[Path], emulate: bool, threads: int) -> Dict[str, Any]:
    from modelscope_plugin.inference.predictor import Predictor
    from modelscope_plugin.inference.preprocess import load_image

    report: Dict[str, Any] = {"model": name}
    first_image = load_image(str(image_paths[0]))
    started = time.perf_counter()
    config, network = build(name, first_image[:, :, ::-1].copy())
    report["build_seconds"] = round(time.perf_counter() - started, 1)
    full = Predictor(network, config, torch.device("cpu"), precision="fp32")
    half = Predictor(network, config, torch.device("cpu"), precision="bf16")
    parameters = half.parameters()
    # the audit: one image through what Predictor(precision="bf16") does
    prepared = half.prepare(str(image_paths[0]))
    report["input"] = list(prepared.tensor.shape[-2:])
    audit = DtypeAudit(network, emulate_bf16=emulate)
    started = time.perf_counter()
    with audit:
        output = half.run(prepared.tensor[None], parameters.task)
        audit.phase = "postprocess"
        class_logits, mask_logits = output.class_logits[0], output.mask_logits[0]
        half.postprocess(prepared, class_logits, mask_logits, parameters)
    audit.remove_hooks()
    report["audit_seconds"] = round(time.perf_counter() - started, 1)
    report["audit"] = audit.summary()
    print_summary(f"{name}, input {report['input']}", report["audit"])
    # agreement with fp32 on each image
    report["agreement"] = []
    for path in image_paths:
        prepared = full.prepare(str(path))
        reference = full.predict_prepared([prepared], parameters)[0]
        with DtypeAudit(emulate_bf16=emulate):
            result = half.predict_prepared([prepared], parameters)[0]
        entry = {"image": path.name, **agreement(result, reference, prepared.original_size)}
        report["agreement"].append(entry)
        print(f"   agreement with fp32 on {path.name}: class {entry['class']:.4%}, instance {entry['instance']:.4%} "
              f"({entry['segments']} segments fp32, {entry['segments_bf16']} bf16)", flush=True)
    return report


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--images", type=int, default=len(IMAGES), help="COCO images for the agreement (1-3)")
    parser.add_argument("--emulate", choices=("auto", "yes", "no"), default="auto",
                        help="emulate bf16 matrix products (auto: where the CPU has no native bf16 units)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="JSON report")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    sys.path.insert(0, str(REPOSITORY / "benchmarks"))
    import gpu_check  # noqa: F401  (loads the package without ModelScope's registration, as on a GPU machine)

    from modelscope_plugin.inference.precision import cpu_has_native_bf16

    emulate = arguments.emulate == "yes" or (arguments.emulate == "auto" and not cpu_has_native_bf16())
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{cpu_has_native_bf16()}, bf16 matrix products {'emulated' if emulate else 'native'}", flush=True)
    reports = [audit_model(name, IMAGES[:arguments.images], emulate, arguments.threads) for name in arguments.models]
    if arguments.output:
        arguments.output.write_text(json.dumps(reports, indent=1))
    return {"reports": reports}


if __name__ == "__main__":
    main()
