"""bf16 autocast through the Predictor: agreement with fp32 on shaped-weight networks, and matrix products that stay
in bf16 (``benchmarks/bf16_audit.py``'s ``DtypeAudit`` counts their FLOPs by input dtype), so that a change that
silently sends the bf16 path back to fp32 fails here."""
import contextlib
import re
import sys

import pytest
import torch
from conftest import REPO, SHARED_DATA

from modelscope_plugin.builders import build_fastinst
from modelscope_plugin.config import FastInstConfig, PreprocessConfig, ResNetConfig
from modelscope_plugin.inference.predictor import Predictor
from modelscope_plugin.model_dirs.load import load_model_dir
from modelscope_plugin.modeling.layers import cpu_bf16
from modelscope_plugin.modeling.fastinst.transformer_decoder import instance_activation_scores

sys.path.insert(0, str(REPO / "benchmarks"))
from bf16_audit import DtypeAudit, agreement  # noqa: E402
from shaped_weights import shape_fastinst_weights  # noqa: E402

IMAGE = SHARED_DATA / "coco" / "val2017" / "000000439180.jpg"


def bf16_against_fp32(config, network):
    """(pixel agreement of bf16 with fp32 on IMAGE through the Predictor, the audit of the bf16 forward)."""
    full = Predictor(network, config, torch.device("cpu"), precision="fp32")
    half = Predictor(network, config, torch.device("cpu"), precision="bf16")
    parameters = full.parameters()
    prepared = full.prepare(str(IMAGE))
    reference = full.predict_prepared([prepared], parameters)[0]
    audit = DtypeAudit(network)
    with audit:
        output = half.run(prepared.tensor[None], parameters.task)
    audit.remove_hooks()
    result = half.postprocess(prepared, output.class_logits[0], output.mask_logits[0], parameters)
    return agreement(result, reference, prepared.original_size), audit


def test_mask2former_bf16_agrees_with_fp32_and_keeps_its_matrix_products_in_bf16(tiny_model_dir):
    config, network = load_model_dir(tiny_model_dir)
    # the demo's 384-pixel input: at the card's 800 this random network keeps segments whose class scores sit at the
    # 0.8 threshold, and bf16 rounding adds or drops one (93 % of pixels)
    config.preprocess = PreprocessConfig(short_side=384, long_side_max=640)
    scores, audit = bf16_against_fp32(config, network.eval())
    assert scores["segments"] >= 3, scores
    assert scores["class"] >= 0.99 and scores["instance"] >= 0.99, scores
    # forward: every matrix product in bf16 (1.0 measured; 0.94 while the deformable attention's four projections
    # ran in fp32)
    assert audit.bf16_matrix_share("forward") >= 0.99, audit.matrix_flops_by_dtype("forward")


def shaped_fastinst():
    """A narrow FastInst R18 with non-degenerate random outputs (after tests/oracles/fastinst_oracle.py's
    ``shape_weights``): live batch-norm statistics, a sharper proposal head, spread class logits and sparse masks (a
    constant mask-feature channel with a negative coefficient)."""
    config = FastInstConfig(num_classes=5, num_queries=12, num_aux_queries=3, hidden_dim=32, mask_dim=24,
                            num_heads=4, feedforward_dim=48, decoder_layers=2, num_groups=32,
                            backbone=ResNetConfig(depth=18),
                            preprocess=PreprocessConfig(short_side=256, long_side_max=384, divide_by_std=True))
    config.class_names = tuple(f"class_{index}" for index in range(config.num_classes))
    config.category_ids = tuple(range(1, config.num_classes + 1))
    torch.manual_seed(0)
    network = build_fastinst(config).eval()
    shape_fastinst_weights(network, seed=0, proposal_gain=30.0, mask_offset=-2.0)
    return config, network


def test_fastinst_bf16_agrees_with_fp32_and_keeps_its_matrix_products_in_bf16():
    """The queries are picked by a top-k over the proposal scores: ranked in bf16 they tied and 59 % of the pixels
    agreed here (98.1 % since the ranking is float32)."""
    config, network = shaped_fastinst()
    scores, audit = bf16_against_fp32(config, network)
    assert scores["segments"] >= 3 and scores["segments_bf16"] >= 3, scores
    assert scores["class"] >= 0.95, scores
    assert audit.bf16_matrix_share("forward") >= 0.99, audit.matrix_flops_by_dtype("forward")


def test_fastinst_ranks_query_pixels_in_float32_whatever_the_logits_dtype():
    """bf16 logits are ranked as their float32 values are: bf16 probabilities tie (8 significant bits), and the
    top-k would break the ties by pixel index."""
    generator = torch.Generator().manual_seed(0)
    # (B, C + 1, h, w) logits of a confident head, rounded to bf16 as a bf16 convolution returns them
    logits = (4 * torch.randn(2, 9, 20, 30, generator=generator)).to(torch.bfloat16)
    scores = instance_activation_scores(logits)
    reference = instance_activation_scores(logits.float())
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference, rtol=0, atol=0)
    assert torch.equal(scores.topk(50, dim=1).indices, reference.topk(50, dim=1).indices)


@pytest.mark.parametrize("emulate", [False, True])
def test_audit_counts_flops_by_dtype_and_changes_no_result(emulate):
    torch.manual_seed(0)
    linear, convolution = torch.nn.Linear(16, 8), torch.nn.Conv2d(3, 4, 3)
    rows, image = torch.randn(5, 16), torch.randn(1, 3, 8, 8)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = (linear(rows), convolution(image), torch.einsum("rc,qc->rq", rows, rows))
            with torch.autocast("cpu", enabled=False):
                outside = linear(rows)
        return (*inside, outside)

    with torch.inference_mode():
        expected = run()
        audit = DtypeAudit(emulate_bf16=emulate)
        with audit:
            results = run()
    for result, reference in zip(results, expected):
        assert result.dtype == reference.dtype
        assert torch.equal(result, reference) or emulate and torch.allclose(result.float(), reference.float(),
                                                                            rtol=1e-2, atol=1e-2)
    flops = audit.matrix_flops_by_dtype()
    # linear 2*5*16*8 (twice: bf16 and fp32), convolution 2*4*27*36, einsum's bmm 2*5*5*16
    assert flops == {"bf16": 1280 + 7776 + 800, "fp32": 1280}, flops



@pytest.mark.skipif(cpu_bf16.FUSED_LINEAR is None, reason="this torch build has no oneDNN linear + GELU")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_fuses_in_bf16_inference_rounding_once_and_runs_as_written_elsewhere(approximate):
    torch.manual_seed(0)
    linear, activation = torch.nn.Linear(48, 96), torch.nn.GELU(approximate=approximate)
    tokens = 2 * torch.randn(3, 10, 48)
    # the same bf16 operands, products summed and GELU applied in float64, rounded to bf16 once
    exact = torch.nn.functional.gelu(torch.nn.functional.linear(
        tokens.bfloat16().double(), linear.weight.bfloat16().double(), linear.bias.bfloat16().double()),
        approximate=approximate)
    audit = DtypeAudit()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), audit:
        fused = cpu_bf16.linear_gelu(tokens, linear, activation)
    assert fused.dtype == torch.bfloat16 and fused.shape == (3, 10, 96)
    # within one bf16 rounding of the exact value (two roundings, linear then GELU, miss it on some entries)
    assert ((fused.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
    assert audit.matrix_flops_by_dtype() == {"bf16": 2 * 30 * 48 * 96}  # one product, counted as a linear layer
    with torch.no_grad():  # float32: the modules as written, bit for bit
        assert torch.equal(cpu_bf16.linear_gelu(tokens, linear, activation), activation(linear(tokens)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # recording gradients: unfused, differentiable
        trained = cpu_bf16.linear_gelu(tokens, linear, activation)
        assert torch.equal(trained, activation(linear(tokens)))
    trained.float().sum().backward()
    assert linear.weight.grad is not None

# ---- precision="auto": bf16 where the device has native bf16 units, else fp32 ---------------------------------
@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_resolves_by_native_bf16_and_the_predictor_records_the_resolved_one(
        tiny_model_dir, monkeypatch, caplog, native):
    from modelscope_plugin.inference import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    precision._log_auto.cache_clear()
    caplog.set_level("INFO", logger=precision.__name__)
    config, network = load_model_dir(tiny_model_dir)
    expected = "bf16" if native else "fp32"
    for _ in range(2):
        assert Predictor(network, config, torch.device("cpu"), precision="auto").precision == expected
    assert precision.resolve_precision("auto", "cpu") == expected
    logged = [record.getMessage() for record in caplog.records if "precision 'auto'" in record.getMessage()]
    assert logged == [f"precision 'auto' on cpu: {expected} ({'native' if native else 'no native'} bfloat16 units)"]
    precision._log_auto.cache_clear()


def test_auto_precision_on_this_cpu_and_on_cuda(monkeypatch):
    from modelscope_plugin.inference import precision

    # this VM: AVX2 without native bf16 -> fp32; a CPU with AVX-512 BF16 / AMX -> bf16
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if precision.cpu_has_native_bf16() else "fp32")
    # CUDA: what torch.cuda.is_bf16_supported says without emulation (compute capability 8.0+)
    asked = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for supported in (True, False):
        def is_bf16_supported(including_emulation=True, supported=supported):
            asked.append(including_emulation)
            return supported

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        assert precision.resolve_precision("auto", "cuda:0") == ("bf16" if supported else "fp32")
    assert asked == [False, False]  # native bf16 only: an emulated one is slower than fp32
    assert precision.resolve_precision("auto", "meta") == "fp32"  # any other device


@pytest.mark.parametrize("value", ["int8", "AUTO", "bfloat16", None])
def test_unknown_precision_is_one_error_naming_it(tiny_model_dir, value):
    config, network = load_model_dir(tiny_model_dir)
    with pytest.raises(ValueError, match=rf"precision must be one of \['fp32', 'bf16', 'fp16', 'auto'\], "
                                         rf"got {re.escape(repr(value))}"):
        Predictor(network, config, torch.device("cpu"), precision=value)


@pytest.mark.parametrize("mkldnn_bf16, capabilities, native", [
    (False, {"architecture": "x86_64", "avx512_bf16": True}, False),  # oneDNN without bf16 (AVX2, this VM)
    (True, {"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": False}, False),  # AVX-512 without bf16 units
    (True, {"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False}, True),  # Cooper Lake, Zen 4
    (True, {"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": True}, True),  # AMX
    (True, {"architecture": "aarch64"}, True),  # Arm: oneDNN's own check
])
def test_native_bf16_on_x86_needs_the_bf16_instructions_not_only_avx512(monkeypatch, mkldnn_bf16, capabilities,
                                                                         native):
    """torch's ``_is_mkldnn_bf16_supported`` is oneDNN's "ISA >= avx512_core": true on AVX-512 CPUs whose bf16 runs
    converted to fp32, where "auto" would pick a bf16 no faster than fp32."""
    from modelscope_plugin.inference import precision

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    precision.cpu_has_native_bf16.cache_clear()
    try:
        assert precision.cpu_has_native_bf16() is native
        assert precision.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    finally:
        precision.cpu_has_native_bf16.cache_clear()
