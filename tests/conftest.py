import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ORACLE_PYTHON = REPO / ".venv-oracle" / "bin" / "python"
sys.path.insert(0, str(REPO / "tests"))

import modelscope_plugin  # noqa: E402,F401  (registers with ModelScope)
from modelscope_plugin.builders import build_mask2former  # noqa: E402
from modelscope_plugin.config import Mask2FormerConfig, SwinConfig  # noqa: E402


def tiny_config(**overrides) -> Mask2FormerConfig:
    """A Swin Mask2Former small enough for unit tests (133 COCO classes, 20 queries)."""
    values = dict(
        backbone=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7, drop_path_rate=0.0),
        num_queries=20, hidden_dim=64, num_heads=4, encoder_layers=2, encoder_feedforward_dim=128, decoder_layers=3,
        decoder_feedforward_dim=128, num_groups=32, task="panoptic",
    )
    values.update(overrides)
    return Mask2FormerConfig(**values)


def shape_weights(network, seed: int = 0) -> None:
    """Random weights with non-degenerate outputs (as DESIGN.md advises): distinct queries with confident, different
    classes (spread query features and class head, small decoder residual branches) and sparse masks (a constant
    mask-feature channel whose coefficient is a negative offset)."""
    generator = torch.Generator().manual_seed(seed)
    decoder = network.transformer_decoder
    with torch.no_grad():
        num_queries, hidden = decoder.query_feat.weight.shape
        decoder.query_feat.weight.copy_(torch.randn(num_queries, hidden, generator=generator) * 2)
        for layer in decoder.transformer_cross_attention_layers:
            layer.multihead_attn.out_proj.weight.mul_(0.1)
        for layer in decoder.transformer_self_attention_layers:
            layer.self_attn.out_proj.weight.mul_(0.1)
        for layer in decoder.transformer_ffn_layers:
            layer.linear2.weight.mul_(0.1)
        decoder.class_embed.weight.copy_(torch.randn(decoder.class_embed.weight.shape, generator=generator) * 2.0)
        mask_features = network.pixel_decoder.mask_features
        mask_features.weight[-1] = 0
        mask_features.bias[-1] = 1.0
        last = decoder.mask_embed.layers[-1]
        last.weight.mul_(4)
        last.weight[-1] = 0
        last.bias[-1] = -3.0


def write_native_model_dir(directory: Path, config: Mask2FormerConfig, network) -> Path:
    """A model directory in this package's own layout (configuration.json type "mask2former" + pytorch_model.pt)."""
    directory.mkdir(parents=True, exist_ok=True)
    config_values = asdict(config)
    backbone = config_values.pop("backbone")
    backbone["type"] = "swin" if isinstance(config.backbone, SwinConfig) else "resnet"
    config_values["backbone"] = backbone
    configuration = {"framework": "pytorch", "task": "image-segmentation",
                     "model": {"type": "mask2former", "config": config_values},
                     "pipeline": {"type": "mask2former-segmentation"}}
    (directory / "configuration.json").write_text(json.dumps(configuration, indent=2))
    torch.save({"state_dict": network.state_dict()}, directory / "pytorch_model.pt")
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config()
    network = build_mask2former(config).eval()
    shape_weights(network)
    return write_native_model_dir(tmp_path_factory.mktemp("tiny_mask2former"), config, network)


def run_oracle(script: str, *arguments, timeout: int = 1800) -> None:
    """Runs a reference implementation in the oracle environment; fails the test if it is missing (run make test)."""
    if not ORACLE_PYTHON.exists():
        pytest.fail(f"oracle environment {ORACLE_PYTHON.parent.parent} is missing; `make test` builds it")
    environment = dict(os.environ, PYTHONPATH=str(REPO), PIP_REQUIRE_VIRTUALENV="1")
    completed = subprocess.run([str(ORACLE_PYTHON), str(REPO / "tests" / "oracles" / script), *map(str, arguments)],
                               capture_output=True, text=True, timeout=timeout, env=environment, cwd=REPO)
    if completed.returncode != 0:
        raise AssertionError(f"oracle {script} failed:\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}")
