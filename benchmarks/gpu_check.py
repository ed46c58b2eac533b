"""GPU check (issue 28, item 4): CUDA parity in fp32, then network and end-to-end FPS in fp32 / bf16 / fp16.

    bash benchmarks/gpu_check.sh                                # on a GPU machine; meant to stay under 8 minutes
    bash benchmarks/gpu_check.sh --output /somewhere/gpu_check.json
    PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --quick   # smoke run of every code path on a CPU

Runs without ModelScope and without a network: the networks are built with ``modelscope_plugin.builders`` and
seeded, shaped random weights (no checkpoint is read), and run through ``inference.predictor.Predictor`` directly.
The package's ``__init__`` (which registers with ModelScope) is not run: ``modelscope_plugin`` is put into
``sys.modules`` as a bare package, and ``modelscope`` is marked absent, so an import of it on this path fails loudly.
Without torchvision, ``torchvision_stand_in.py`` supplies the ResNet blocks and ``StochasticDepth`` the networks use.

1. parity (fp32, TF32 off): each network on the device vs the same network on the CPU (logits and post-processed
   pixels); where transformers is importable, transformers' Mask2Former vs this package's on the device with the
   same weights (tests/oracles/hf_oracle.py builds them; ``load_hf_model_dir`` converts them).
2. speed: Mask2Former Swin-L and R50 (panoptic, 800 / 1333) and FastInst R50-D1 (576 / 777) and R50-D3 (instance,
   640 / 1333, the hub card) on one 480x640 synthetic image, batch 1, in fp32 / bf16 / fp16 (fp16 on CUDA only),
   each in "eager" mode, "cuda-graph" (CUDA only) and "compile" (``torch.compile``, for the models in --compile):
   network FPS (input already on the device), end-to-end FPS (``Predictor``: preprocess on the CPU, forward,
   post-processing on the device, masks back to the CPU) and pixel agreement with fp32 eager. A mode that fails
   is recorded with its error and skipped.
3. the targets (on an H100) beside the best figures.

Every figure goes to a JSON file (--output; default $OUT/gpu_check.json if $OUT is set, else ./gpu_check.json),
rewritten after each step so that a run cut short still leaves what it measured.
"""
import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
ORACLES = REPOSITORY / "tests" / "oracles"
PRECISIONS = ("fp32", "bf16", "fp16")
MODES = ("eager", "cuda-graph", "compile")
# the targets' models first, so that a run cut short has measured them
MODEL_NAMES = ("fastinst-r50-d1", "mask2former-swin-l", "fastinst-r50-d3", "mask2former-r50")
# (model, figure, lower bound) on an H100, issue 28
TARGETS = (
    ("fastinst-r50-d1", "network_fps", 100.0),
    ("fastinst-r50-d1", "end_to_end_fps", 60.0),
    ("mask2former-swin-l", "network_fps", 10.0),
)


def import_package_without_modelscope() -> None:
    """Makes ``import modelscope_plugin.<module>`` work without running the package's ``__init__`` (which imports
    ModelScope to register with it) and makes any import of ModelScope fail, as on the GPU machine."""
    if "modelscope" not in sys.modules:
        sys.modules["modelscope"] = None  # ``import modelscope`` now raises ModuleNotFoundError
    if "modelscope_plugin" not in sys.modules:
        package = types.ModuleType("modelscope_plugin")
        package.__path__ = [str(REPOSITORY / "modelscope_plugin")]
        package.__file__ = str(REPOSITORY / "modelscope_plugin" / "__init__.py")
        sys.modules["modelscope_plugin"] = package


import_package_without_modelscope()
sys.path.insert(0, str(REPOSITORY / "benchmarks"))
import torchvision_stand_in  # noqa: E402
from shaped_weights import shape_fastinst_weights  # noqa: E402

# the networks take torchvision's ResNet blocks; without torchvision, the stand-in's while they are imported
with torchvision_stand_in.installed_if_missing() as TORCHVISION_STAND_IN:
    import modelscope_plugin.modeling.backbones.resnet  # noqa: E402, F401
    import modelscope_plugin.modeling.backbones.swin  # noqa: E402, F401
    from modelscope_plugin.builders import build_fastinst, build_mask2former  # noqa: E402
from modelscope_plugin.config import (  # noqa: E402
    PreprocessConfig,
    fastinst_r50_d3_coco,
    fastinst_release,
    resnet50_coco_panoptic,
    swin_large_coco_panoptic,
)
from modelscope_plugin.inference.precision import inference_context  # noqa: E402
from modelscope_plugin.inference.predictor import Predictor  # noqa: E402


def modelscope_modules_loaded() -> List[str]:
    return sorted(name for name, module in sys.modules.items() if module is not None
                  and (name == "modelscope" or name.startswith(("modelscope.", "modelscope_hub"))))


# ---------------------------------------------------------------------------------------------------------------
# models with shaped random weights
# ---------------------------------------------------------------------------------------------------------------
def model_config(name: str):
    if name == "mask2former-swin-l":
        config = swin_large_coco_panoptic()
    elif name == "mask2former-r50":
        config = resnet50_coco_panoptic()
    elif name == "fastinst-r50-d1":
        config = fastinst_release(depth=50, decoder_layers=1)
    elif name == "fastinst-r50-d3":
        config = fastinst_r50_d3_coco()
    else:
        raise ValueError(f"unknown model {name!r}")
    number_of_classes = config.num_classes  # Mask2Former: things + stuff; FastInst: things
    config.class_names = tuple(f"class_{index}" for index in range(number_of_classes))
    config.category_ids = tuple(range(1, number_of_classes + 1))
    return config


def calibrate_fastinst_masks(network: torch.nn.Module, pixels: torch.Tensor, coverage: float = 0.1,
                             iterations: int = 2) -> None:
    """Offsets the constant mask-feature channel's coefficient so that the median query's mask covers about
    ``coverage`` of the image (``shape_fastinst_weights`` leaves it at 0: half of every mask would be on)."""
    decoder = network.transformer_decoder
    for _ in range(iterations):
        with torch.inference_mode():
            mask_logits = network(pixels).mask_logits[0].float()
        offset = torch.quantile(mask_logits.flatten(1), 1.0 - coverage, dim=1).median().item()
        with torch.no_grad():
            for mlp in decoder.mask_embed_layers:
                mlp.layers[-1].bias[-1] -= offset


def transformers_importable() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def hf_oracle_mask2former(preset: str):
    """(config, network): tests/oracles/hf_oracle.py's seeded, shaped transformers Mask2Former (the weights of the
    transformers parity tests and of pipeline_speed.py), converted through ``load_hf_model_dir``; also the
    transformers model itself."""
    sys.path.insert(0, str(ORACLES))
    import hf_oracle

    from modelscope_plugin.model_dirs.hf import load_hf_model_dir

    options = hf_oracle.resolve_options(argparse.Namespace(backbone=preset))
    transformers_model, _ = hf_oracle.make_model(options, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        transformers_model.save_pretrained(folder)
        config, network = load_hf_model_dir(Path(folder))
    return config, network.eval(), transformers_model


BUILT_MODELS: Dict[str, Any] = {}


def build_model(name: str, preprocess: Optional[PreprocessConfig], weights: str, image: np.ndarray):
    """(config, network on the CPU in eval mode, description of the weights, the transformers model with the same
    weights or None), built once per model and cached.

    Mask2Former: ``weights="hf-oracle"`` takes tests/oracles/hf_oracle.py's shaped weights (needs transformers;
    several confident segments per image), ``"demo"`` the package's ``shape_random_weights`` (tuned for the tiny
    demo network: on the full networks most queries overlap and panoptic fusion keeps few or none). FastInst:
    ``shape_fastinst_weights``, then the masks calibrated on ``image``. ``preprocess`` (None: the card's) only
    changes the returned config."""
    if name not in BUILT_MODELS:
        card_config = model_config(name)
        transformers_model = None
        torch.manual_seed(0)
        if name.startswith("mask2former") and weights == "hf-oracle":
            config, network, transformers_model = hf_oracle_mask2former(
                {"mask2former-swin-l": "swin-l", "mask2former-r50": "r50"}[name])
            config.preprocess, config.task, config.source = card_config.preprocess, "panoptic", card_config.source
            description = "tests/oracles/hf_oracle.py shaped random weights (seed 0)"
        elif name.startswith("mask2former"):
            from modelscope_plugin.apps.demo import shape_random_weights

            config, network = card_config, build_mask2former(card_config).eval()
            shape_random_weights(network)
            description = "modelscope_plugin.apps.demo.shape_random_weights (seed 0)"
        else:
            config, network = card_config, build_fastinst(card_config).eval()
            shape_fastinst_weights(network)
            calibration_config = dataclasses.replace(config, preprocess=preprocess or config.preprocess)
            calibration = Predictor(network, calibration_config, torch.device("cpu")).prepare(image)
            calibrate_fastinst_masks(network, calibration.tensor[None])
            description = "gpu_check.shape_fastinst_weights (seed 0), masks calibrated to ~10 % coverage"
        BUILT_MODELS[name] = (config, network, description, transformers_model)
    config, network, description, transformers_model = BUILT_MODELS[name]
    config = dataclasses.replace(config, preprocess=preprocess or config.preprocess)
    return config, network, description, transformers_model


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A (H, W, 3) uint8 BGR image of smooth blobs and edges (the Predictor's array convention)."""
    generator = np.random.default_rng(seed)
    coarse = generator.uniform(0, 255, size=(max(2, height // 40), max(2, width // 40), 3)).astype(np.float32)
    import cv2

    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    for _ in range(6):
        top, left = generator.integers(0, height // 2), generator.integers(0, width // 2)
        image[top:top + height // 3, left:left + width // 3] = generator.uniform(0, 255, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# comparing outputs
# ---------------------------------------------------------------------------------------------------------------
def label_map(result: Dict[str, Any]) -> np.ndarray:
    """Per pixel, the label id of its segment (-1: none). Panoptic: ``panoptic_seg``; instance: masks painted in
    ascending score, so the highest-scoring mask wins where masks overlap."""
    if "panoptic_seg" in result:
        labels = np.full(result["panoptic_seg"].shape, -1, dtype=np.int64)
        for segment in result["segments_info"]:
            labels[result["panoptic_seg"] == segment["id"]] = segment["label_id"]
        return labels
    masks = result["masks"]
    if not masks:
        return None
    labels = np.full(masks[0].shape, -1, dtype=np.int64)
    for index in np.argsort(result["scores"], kind="stable"):
        labels[masks[index].astype(bool)] = result["label_ids"][index]
    return labels


def pixel_agreement(result: Dict[str, Any], reference: Dict[str, Any], original_size) -> float:
    """Fraction of pixels whose label (or absence of one) is the same in both results."""
    ours, theirs = label_map(result), label_map(reference)
    if ours is None:
        ours = np.full(original_size, -1, dtype=np.int64)
    if theirs is None:
        theirs = np.full(original_size, -1, dtype=np.int64)
    return float((ours == theirs).mean())


def logit_difference(ours: torch.Tensor, theirs: torch.Tensor) -> Dict[str, float]:
    ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
    difference = (ours - theirs).abs()
    value_range = max(1.0, theirs.abs().max().item())
    return {"max_abs_difference": difference.max().item(), "mean_abs_difference": difference.mean().item(),
            "max_abs_value": theirs.abs().max().item(),
            "relative_max_difference": difference.max().item() / value_range}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# 1. parity
# ---------------------------------------------------------------------------------------------------------------
def parity_against_cpu(name: str, config, network: torch.nn.Module, device: torch.device,
                       image: np.ndarray) -> Dict[str, Any]:
    """The same fp32 network on the device and on the CPU: logits and post-processed pixels."""
    cpu_predictor = Predictor(network, config, torch.device("cpu"), "fp32")
    device_predictor = Predictor(copy.deepcopy(network).to(device), config, device, "fp32")
    prepared = cpu_predictor.prepare(image)
    parameters = cpu_predictor.parameters()
    cpu_output = cpu_predictor.run(prepared.tensor[None])
    device_output = device_predictor.run(prepared.tensor[None])
    cpu_result = cpu_predictor.postprocess(prepared, cpu_output.class_logits[0], cpu_output.mask_logits[0], parameters)
    device_result = device_predictor.postprocess(prepared, device_output.class_logits[0], device_output.mask_logits[0],
                                                 parameters)
    report = {
        "model": name, "input": list(prepared.padded_size), "task": parameters.task,
        "class_logits": logit_difference(device_output.class_logits, cpu_output.class_logits),
        "mask_logits": logit_difference(device_output.mask_logits, cpu_output.mask_logits),
        "segments_cpu": len(cpu_result["masks"]), "segments_device": len(device_result["masks"]),
        "pixel_agreement": pixel_agreement(device_result, cpu_result, prepared.original_size),
    }
    del device_predictor
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def parity_against_transformers(name: str, network: torch.nn.Module, transformers_model: torch.nn.Module,
                                 pixels: torch.Tensor, device: torch.device) -> Dict[str, Any]:
    """transformers' Mask2FormerForUniversalSegmentation vs this package's network with the same weights
    (``hf_oracle_mask2former``), both on the device in fp32, on the same pixels: logits, as
    tests/test_parity_transformers.py compares them (its bound: at most 2 % of the queries off by more than 1e-4 of
    the logit range, none by more than 1 % of it)."""
    ours_network = copy.deepcopy(network).to(device)
    theirs_network = copy.deepcopy(transformers_model).to(device).eval()
    pixels = pixels.to(device)
    with torch.inference_mode():
        ours = ours_network(pixels)
        theirs = theirs_network(pixel_values=pixels)
    report: Dict[str, Any] = {"model": name, "input": list(pixels.shape[-2:])}
    for label, ours_logits, theirs_logits in (("class_logits", ours.class_logits, theirs.class_queries_logits),
                                              ("mask_logits", ours.mask_logits, theirs.masks_queries_logits)):
        entry = logit_difference(ours_logits, theirs_logits)
        query_errors = (ours_logits - theirs_logits).abs().flatten(2).amax(-1)[0].float()
        value_range = max(1.0, theirs_logits.abs().max().item())
        entry["queries_over_1e-4_of_range"] = float((query_errors >= 1e-4 * value_range).float().mean().item())
        entry["within_test_bound"] = bool(entry["queries_over_1e-4_of_range"] <= 0.02
                                          and query_errors.max().item() < 1e-2 * value_range)
        report[label] = entry
    report["class_argmax_agreement"] = float(
        (ours.class_logits.argmax(-1) == theirs.class_queries_logits.argmax(-1)).float().mean().item())
    report["mask_sign_agreement"] = float(
        ((ours.mask_logits > 0) == (theirs.masks_queries_logits > 0)).float().mean().item())
    del ours_network, theirs_network
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


# ---------------------------------------------------------------------------------------------------------------
# 2. speed
# ---------------------------------------------------------------------------------------------------------------
class GraphedNetwork(torch.nn.Module):
    """A network captured as one CUDA graph for one input shape and precision; other shapes run the network."""

    def __init__(self, network: torch.nn.Module, example_pixels: torch.Tensor, precision: str, warmup: int = 3):
        super().__init__()
        self.network = network
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.dtype = dtype
        self.static_pixels = example_pixels.clone()
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(warmup):
                self.forward_eager(self.static_pixels)
        torch.cuda.current_stream().wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = self.forward_eager(self.static_pixels)

    def forward_eager(self, pixels: torch.Tensor):
        with torch.inference_mode():
            if self.dtype is None:
                return self.network(pixels)
            # autocast's weight cache must be off while capturing (its casts would be freed after capture)
            with torch.autocast(device_type="cuda", dtype=self.dtype, cache_enabled=False):
                return self.network(pixels)

    def forward(self, pixels: torch.Tensor):
        if pixels.shape != self.static_pixels.shape:
            return self.forward_eager(pixels)
        self.static_pixels.copy_(pixels)
        self.graph.replay()
        return self.static_output


class CompiledNetwork(torch.nn.Module):
    """``torch.compile(network)``; each call starts a new step of compiled CUDA graphs (reduce-overhead mode), whose
    outputs the next call may overwrite: every caller here reads an output before the next call."""

    def __init__(self, network: torch.nn.Module, compile_mode: str):
        super().__init__()
        self.compiled = torch.compile(network, mode=compile_mode, dynamic=False)

    def forward(self, pixels: torch.Tensor):
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(pixels)


def make_runner(mode: str, network: torch.nn.Module, pixels: torch.Tensor, precision: str,
                device: torch.device, compile_mode: str) -> torch.nn.Module:
    """The module a ``Predictor`` runs in ``mode`` (raises when the mode does not work for this network)."""
    if mode == "eager":
        return network
    if mode == "cuda-graph":
        if device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device")
        return GraphedNetwork(network, pixels, precision)
    if mode == "compile":
        compiled = CompiledNetwork(network, compile_mode if device.type == "cuda" else "default")
        with inference_context(device, precision):
            compiled(pixels)  # compiles here, so the first timed call does not
        synchronize(device)
        return compiled
    raise ValueError(mode)


def frames_per_second(call: Callable[[], Any], device: torch.device, warmup: int, iterations: int) -> float:
    for _ in range(warmup):
        call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        call()
    synchronize(device)
    return iterations / (time.perf_counter() - start)


def time_model(name: str, config, network: torch.nn.Module, device: torch.device, image: np.ndarray,
               arguments, deadline: float, save: Callable[[], None], report: Dict[str, Any]) -> None:
    """Fills ``report`` (this model's entry) with one row per (precision, mode)."""
    network = network.to(device)
    reference_predictor = Predictor(network, config, device, "fp32")
    prepared = reference_predictor.prepare(image)
    parameters = reference_predictor.parameters()
    report.update(input=list(prepared.padded_size), image=list(prepared.original_size), task=parameters.task, rows=[])
    device_pixels = prepared.tensor[None].to(device)
    reference_result = None
    precisions = [precision for precision in PRECISIONS if not (precision == "fp16" and device.type != "cuda")]
    compile_models = MODEL_NAMES if arguments.compile == "all" else (
        () if arguments.compile == "none" else tuple(arguments.compile.split(",")))
    for precision in precisions:
        for mode in MODES:
            row: Dict[str, Any] = {"precision": precision, "mode": mode}
            report["rows"].append(row)
            skip_reason = None
            if mode == "cuda-graph" and device.type != "cuda":
                skip_reason = "CUDA only"
            elif mode == "compile" and name not in compile_models:
                skip_reason = "not in --compile"
            elif mode == "compile" and precision not in arguments.compile_precisions.split(","):
                skip_reason = "not in --compile-precisions"
            elif mode != "eager" and time.perf_counter() > deadline:
                skip_reason = "time budget spent (--budget-seconds)"
            if skip_reason is not None:
                row["skipped"] = skip_reason
                print_row(name, row)
                continue
            started = time.perf_counter()
            try:
                runner = make_runner(mode, network, device_pixels, precision, device, arguments.compile_mode)
                row["setup_seconds"] = round(time.perf_counter() - started, 2)

                def network_call():
                    with inference_context(device, precision):
                        return runner(device_pixels)

                row["network_fps"] = frames_per_second(network_call, device, arguments.warmup, arguments.iterations)
                predictor = Predictor(runner, config, device, precision)

                def end_to_end_call():
                    return predictor.predict_prepared([predictor.prepare(image)], parameters)[0]

                row["end_to_end_fps"] = frames_per_second(end_to_end_call, device, arguments.warmup,
                                                          arguments.iterations)
                result = end_to_end_call()
                if precision == "fp32" and mode == "eager":
                    reference_result = result
                row["segments"] = len(result["masks"])
                row["pixel_agreement_with_fp32"] = (None if reference_result is None else
                                                    pixel_agreement(result, reference_result, prepared.original_size))
            except Exception as error:  # a mode that does not work here is reported, not fatal
                row["error"] = f"{type(error).__name__}: {error}"[:2000]
                row["traceback_tail"] = traceback.format_exc()[-1500:]
                if device.type == "cuda":
                    try:  # a failed CUDA graph capture can leave an error on the stream
                        torch.cuda.synchronize(device)
                    except Exception as synchronize_error:
                        row["synchronize_error"] = f"{type(synchronize_error).__name__}: {synchronize_error}"[:500]
            finally:
                row["seconds"] = round(time.perf_counter() - started, 2)
                runner = predictor = None
                if mode == "compile":
                    torch._dynamo.reset()
            print_row(name, row)
            save()
    if device.type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30


def print_row(name: str, row: Dict[str, Any]) -> None:
    label = f"{name:20s} {row['precision']:5s} {row['mode']:10s}"
    if "skipped" in row:
        print(f"{label} skipped: {row['skipped']}", flush=True)
    elif "error" in row:
        print(f"{label} failed after {row['seconds']} s: {row['error'][:300]}", flush=True)
    else:
        agreement = row["pixel_agreement_with_fp32"]
        agreement_text = "(no fp32 eager result)" if agreement is None else f"{100 * agreement:7.3f} %"
        print(f"{label} network {row['network_fps']:8.2f} FPS  end-to-end {row['end_to_end_fps']:8.2f} FPS  "
              f"pixels as fp32 {agreement_text}  segments {row['segments']:3d}  ({row['seconds']} s)", flush=True)


def best_figure(model_report: Dict[str, Any], figure: str):
    rows = [row for row in model_report.get("rows", []) if figure in row]
    if not rows:
        return None
    return max(rows, key=lambda row: row[figure])


def summarize_targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    summary = []
    device_name = results["machine"]["device_name"]
    print(f"\ntargets (set for an H100; this device: {device_name}), best row of each model:")
    for name, figure, target in TARGETS:
        best = best_figure(results["speed"].get(name, {}), figure)
        entry = {"model": name, "figure": figure, "target": target}
        if best is None:
            entry["measured"] = None
            print(f"  {name:20s} {figure:15s} target >= {target:6.1f}   measured: none")
        else:
            entry.update(measured=best[figure], precision=best["precision"], mode=best["mode"],
                         pixel_agreement_with_fp32=best["pixel_agreement_with_fp32"], met=best[figure] >= target)
            agreement = best["pixel_agreement_with_fp32"]
            agreement_text = "unknown" if agreement is None else f"{100 * agreement:.3f} %"
            print(f"  {name:20s} {figure:15s} target >= {target:6.1f}   measured {best[figure]:8.2f} "
                  f"({best['precision']}, {best['mode']}, pixels as fp32 {agreement_text})"
                  f"  {'met' if entry['met'] else 'NOT met'}")
        summary.append(entry)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
def default_output() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path("gpu_check.json")


def machine_description(device: torch.device) -> Dict[str, Any]:
    description = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                   "torchvision_stand_in": TORCHVISION_STAND_IN,
                   "device": str(device), "cuda_available": torch.cuda.is_available(),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(), "device_name": "cpu",
                   "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        description.update(device_name=properties.name, device_memory_gib=properties.total_memory / 2 ** 30,
                           cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                           bf16_supported=torch.cuda.is_bf16_supported())
    try:
        import transformers

        description["transformers"] = transformers.__version__
    except ImportError:
        description["transformers"] = None
    return description


def print_parity_against_cpu(entry: Dict[str, Any], device_name: str) -> None:
    if "error" in entry:
        print(f"  {entry['model']:20s} {device_name} vs cpu FAILED: {entry['error'][:300]}", flush=True)
        return
    print(f"  {entry['model']:20s} {device_name} vs cpu, input {entry['input']}: class logits max |diff| "
          f"{entry['class_logits']['max_abs_difference']:.2e}, mask logits max |diff| "
          f"{entry['mask_logits']['max_abs_difference']:.2e} (of {entry['mask_logits']['max_abs_value']:.1f}), "
          f"pixels agree {100 * entry['pixel_agreement']:.3f} %, segments {entry['segments_device']} / "
          f"{entry['segments_cpu']}", flush=True)


def print_parity_against_transformers(entry: Dict[str, Any], device_name: str) -> None:
    if "error" in entry:
        print(f"  {entry['model']:20s} vs transformers FAILED: {entry['error'][:300]}", flush=True)
        return
    mask_logits = entry["mask_logits"]
    print(f"  {entry['model']:20s} vs transformers on {device_name}, input {entry['input']}: class logits max |diff| "
          f"{entry['class_logits']['max_abs_difference']:.2e}, mask logits max |diff| "
          f"{mask_logits['max_abs_difference']:.2e} (of {mask_logits['max_abs_value']:.1f}), queries over 1e-4 of the "
          f"range {100 * mask_logits['queries_over_1e-4_of_range']:.1f} %, mask signs agree "
          f"{100 * entry['mask_sign_agreement']:.4f} %, within the parity test's bound: "
          f"{entry['class_logits']['within_test_bound'] and mask_logits['within_test_bound']}", flush=True)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny inputs, one warm-up and one timed iteration, small parity inputs")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default: $OUT/gpu_check.json if $OUT is set, else ./gpu_check.json)")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma-separated, of {MODEL_NAMES}")
    parser.add_argument("--parity-models", default="mask2former-r50,fastinst-r50-d3,mask2former-swin-l",
                        help="models of the parity step, comma-separated")
    parser.add_argument("--compile", default="fastinst-r50-d1",
                        help="models also timed under torch.compile: comma-separated names, 'all' or 'none' "
                             "(compilation costs about a minute per model and precision)")
    parser.add_argument("--compile-precisions", default="bf16,fp16",
                        help="precisions timed under torch.compile (each costs a compilation: about a minute on a GPU "
                             "machine, minutes on a small CPU)")
    parser.add_argument("--compile-mode", default="reduce-overhead",
                        help="torch.compile mode on CUDA (reduce-overhead: inductor kernels replayed as CUDA graphs; "
                             "max-autotune tries more kernels but takes minutes)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per measurement (default 5; quick 1)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="timed calls per measurement (default 20; quick 1)")
    parser.add_argument("--budget-seconds", type=float, default=330.0,
                        help="after this many seconds only eager rows are timed (the whole check must stay < 8 min)")
    parser.add_argument("--mask2former-weights", choices=("auto", "hf-oracle", "demo"), default="auto",
                        help="Mask2Former's shaped random weights: tests/oracles/hf_oracle.py's (needs transformers; "
                             "also gives the parity against transformers) or the demo's; auto: hf-oracle if possible")
    arguments = parser.parse_args(argv)
    arguments.warmup = arguments.warmup if arguments.warmup is not None else (1 if arguments.quick else 5)
    arguments.iterations = arguments.iterations if arguments.iterations is not None else (1 if arguments.quick else 20)
    output = arguments.output or default_output()
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + arguments.budget_seconds

    device = torch.device(arguments.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; use --device cpu for a smoke run")
    # fp32 means fp32: no TF32 in matrix products or convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    results: Dict[str, Any] = {"machine": machine_description(device), "arguments": {
        key: str(value) for key, value in vars(arguments).items()}, "tf32": False, "parity": {}, "speed": {}}

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["modelscope_modules_loaded"] = modelscope_modules_loaded()
        output.write_text(json.dumps(results, indent=1))

    print(f"device {results['machine']['device_name']}, torch {torch.__version__}, output {output}", flush=True)
    if arguments.quick:
        image = synthetic_image(96, 128)
        # FastInst picks 100 queries from the stride-16 map: it needs at least 100 pixels there (160 x 224)
        speed_preprocess = {"mask2former": PreprocessConfig(short_side=128, long_side_max=192),
                            "fastinst": PreprocessConfig(short_side=160, long_side_max=224, resize_backend="pil",
                                                         divide_by_std=True)}
        parity_preprocess = speed_preprocess
    else:
        image = synthetic_image(480, 640)
        speed_preprocess = {"mask2former": None, "fastinst": None}  # the cards' inputs
        parity_preprocess = {"mask2former": PreprocessConfig(short_side=384, long_side_max=512),
                             "fastinst": PreprocessConfig(short_side=384, long_side_max=512, resize_backend="pil",
                                                          divide_by_std=True)}

    # 1. parity
    print("\n1. parity in fp32 (TF32 off)", flush=True)
    if arguments.mask2former_weights == "auto":
        arguments.mask2former_weights = "hf-oracle" if transformers_importable() else "demo"
    results["mask2former_weights"] = arguments.mask2former_weights
    results["parity"]["device_vs_cpu"] = []
    results["parity"]["versus_transformers"] = []
    for name in arguments.parity_models.split(","):
        try:
            config, network, description, transformers_model = build_model(
                name, parity_preprocess[name.split("-")[0]], arguments.mask2former_weights, image)
            entry = parity_against_cpu(name, config, network, device, image)
            entry["weights"] = description
        except Exception as error:
            transformers_model = None
            entry = {"model": name, "error": f"{type(error).__name__}: {error}",
                     "traceback_tail": traceback.format_exc()[-1500:]}
        results["parity"]["device_vs_cpu"].append(entry)
        print_parity_against_cpu(entry, arguments.device)
        save()
        if transformers_model is None:
            continue
        try:
            pixels = Predictor(network, config, torch.device("cpu")).prepare(image).tensor[None]
            entry = parity_against_transformers(name, network, transformers_model, pixels, device)
        except Exception as error:
            entry = {"model": name, "error": f"{type(error).__name__}: {error}",
                     "traceback_tail": traceback.format_exc()[-1500:]}
        results["parity"]["versus_transformers"].append(entry)
        print_parity_against_transformers(entry, arguments.device)
        save()
    if not results["parity"]["versus_transformers"]:
        reason = ("transformers is not importable" if not transformers_importable()
                  else "--mask2former-weights demo (the transformers model is built only for hf-oracle weights)")
        results["parity"]["versus_transformers_skipped"] = reason
        print(f"  parity against transformers skipped: {reason}", flush=True)

    # 2. speed
    print(f"\n2. speed, batch 1, image {image.shape[0]}x{image.shape[1]}, {arguments.warmup} warm-up + "
          f"{arguments.iterations} timed calls per figure", flush=True)
    for name in arguments.models.split(","):
        model_report: Dict[str, Any] = {}
        results["speed"][name] = model_report
        try:
            config, network, description, _ = build_model(name, speed_preprocess[name.split("-")[0]],
                                                          arguments.mask2former_weights, image)
            BUILT_MODELS.pop(name)  # the network moves to the device and is not needed after this model
            model_report["weights"] = description
            time_model(name, config, network, device, image, arguments, deadline, save, model_report)
        except Exception as error:
            model_report["error"] = f"{type(error).__name__}: {error}"
            model_report["traceback_tail"] = traceback.format_exc()[-1500:]
            print(f"{name} FAILED: {model_report['error'][:300]}", flush=True)
        network = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        save()

    # 3. targets
    results["targets"] = summarize_targets(results)
    save()
    loaded = modelscope_modules_loaded()
    print(f"\nModelScope modules imported: {loaded or 'none'}; {results['seconds']} s in all; figures in {output}")
    return results


if __name__ == "__main__":
    main()
