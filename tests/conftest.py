import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ORACLE_PYTHON = REPO / ".venv-oracle" / "bin" / "python"
sys.path.insert(0, str(REPO / "tests"))
# tests/mutations/run.py plants bugs in a copy and runs tests there: run by hand, never collected
collect_ignore = ["mutations"]

import modelscope_plugin  # noqa: E402,F401  (registers with ModelScope)
from modelscope_plugin.apps import demo  # noqa: E402
from modelscope_plugin.builders import build_mask2former  # noqa: E402
from modelscope_plugin.config import Mask2FormerConfig  # noqa: E402


def tiny_config(**overrides) -> Mask2FormerConfig:
    """The demo's small Swin Mask2Former, with overrides."""
    return replace(demo.tiny_config(), **overrides)


shape_weights = demo.shape_random_weights
write_native_model_dir = demo.write_model_dir


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
