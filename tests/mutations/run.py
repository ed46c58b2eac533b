"""Mutation check, run by hand (pytest does not collect this folder: see ``collect_ignore`` in tests/conftest.py).

Each mutation below plants one known bug in a temporary copy of the repository, runs the pytest selection that
should catch it with ``PYTHONPATH`` pointing at the copy, and reports which tests fail. A mutation that no test
catches ("SURVIVED") is a gap in the suite.

    .venv/bin/python tests/mutations/run.py                  # every mutation, CI selection (no slow tests)
    .venv/bin/python tests/mutations/run.py --only box_off_by_one panoptic_constant_score
    .venv/bin/python tests/mutations/run.py --no-oracle      # skip tests marked oracle (minutes each)
    .venv/bin/python tests/mutations/run.py --list
    .venv/bin/python tests/mutations/run.py --only decoder_norm_eps \
        --tests "tests/test_parity_transformers.py::test_logits_match_transformers[swin-t-size1-True]"

``--tests`` takes files or node ids (parametrised ones included) and replaces every selected mutation's own
selection; each test of the selection that passes with the bug planted is listed as a survivor.

Mutations find their target by searching for the exact source snippet across ``modelscope_plugin/**/*.py`` (it
must occur exactly once in the whole package), so they survive files being moved or renamed.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Mutation:
    name: str
    bug: str
    original: str
    replacement: str
    tests: Sequence[str]
    """pytest node ids or files, relative to the repository root."""


MUTATIONS: List[Mutation] = [
    Mutation("bgra_read_as_rgba", "BGRA arrays read as RGBA (B and R not swapped when there is an alpha channel)",
             "return np.ascontiguousarray(array[:, :, 2::-1])",
             "return np.ascontiguousarray(array[:, :, 2::-1] if array.shape[2] == 3 else array[:, :, :3])",
             ["tests/test_inputs.py", "tests/test_inputs_fuzz.py", "tests/test_pipeline.py"]),
    Mutation("instance_mask_logit_gt_2", "instance masks thresholded at logit > 2 instead of > 0",
             "torch.gt(logits, 0.0, out=chunk)", "torch.gt(logits, 2.0, out=chunk)",
             ["tests/test_postprocessing.py", "tests/test_pipeline.py", "tests/test_parity_mmdet_easycv.py"]),
    Mutation("panoptic_constant_score", "panoptic segment scores replaced by the constant 0.999",
             "score = float(kept_scores[query])", "score = 0.999",
             ["tests/test_postprocessing.py", "tests/test_pipeline.py", "tests/test_parity_mmdet_easycv.py"]),
    Mutation("decoder_norm_eps", "Mask2Former decoder norm eps 1e-5 -> 1e-3",
             "self.decoder_norm = nn.LayerNorm(hidden_dim)", "self.decoder_norm = nn.LayerNorm(hidden_dim, eps=1e-3)",
             ["tests/test_decoder.py", "tests/test_parity_mmdet_easycv.py", "tests/test_parity_transformers.py"]),
    Mutation("box_off_by_one", "boxes with inclusive x2/y2 (mmdet's mask2bbox adds 1)",
             "float(columns[-1] + 1), float(rows[-1] + 1)", "float(columns[-1]), float(rows[-1])",
             ["tests/test_postprocessing.py", "tests/test_pipeline.py", "tests/test_inputs.py", "tests/test_evaluation.py"]),
    Mutation("fastinst_channel_swap", "FastInst (PIL-resize) preprocessing feeds BGR instead of RGB",
             "resized = np.asarray(Image.fromarray(rgb).resize(",
             "resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1])).resize(",
             ["tests/test_inputs.py", "tests/test_fastinst.py", "tests/test_fastinst_parity.py"]),
    Mutation("panoptic_overlap_flipped", "panoptic overlap rule flipped (drops queries that win MORE than the threshold)",
             "if won_area / own_area < overlap_threshold:", "if won_area / own_area > overlap_threshold:",
             ["tests/test_postprocessing.py", "tests/test_pipeline.py", "tests/test_parity_mmdet_easycv.py"]),
    Mutation("panoptic_overlap_boundary", "panoptic overlap rule drops a ratio equal to the threshold (<= for <)",
             "if won_area / own_area < overlap_threshold:", "if won_area / own_area <= overlap_threshold:",
             ["tests/test_postprocessing.py"]),
    Mutation("object_mask_threshold_ge", "object mask threshold kept at >= (mmdet: strictly greater)",
             "keep = labels.ne(num_classes) & (scores > object_mask_threshold)",
             "keep = labels.ne(num_classes) & (scores >= object_mask_threshold)",
             ["tests/test_postprocessing.py"]),
    Mutation("filter_low_score_ignored", "filter_low_score ignored (panoptic segments keep pixels their own mask < 0.5)",
             "        if filter_low_score:\n            won = won & own_mask",
             "        if False:\n            won = won & own_mask",
             ["tests/test_postprocessing.py", "tests/test_pipeline.py", "tests/test_parity_mmdet_easycv.py"]),
]


def locate(package: Path, snippet: str) -> Path:
    """The one file under ``package`` holding ``snippet`` exactly once (and no other file holding it)."""
    hits = [(path, path.read_text().count(snippet)) for path in sorted(package.rglob("*.py"))]
    hits = [(path, count) for path, count in hits if count]
    if len(hits) != 1 or hits[0][1] != 1:
        where = ", ".join(f"{path.relative_to(package.parent)} x{count}" for path, count in hits) or "nowhere"
        raise LookupError(f"snippet must occur exactly once in the package, found: {where}\n  {snippet!r}")
    return hits[0][0]


def copy_repository(destination: Path) -> Path:
    """The working tree (without .git, virtual environments, caches) under ``destination/<name>``, beside a link to
    the shared data folder the tests read (``REPO.parent / 'shared'``) and with links to the environments."""
    copy = destination / REPO.name
    ignore = shutil.ignore_patterns(".git", ".venv", ".venv-oracle", "__pycache__", ".pytest_cache", "outputs",
                                    "*.egg-info", ".hypothesis")
    shutil.copytree(REPO, copy, ignore=ignore, symlinks=True)
    for environment in (".venv", ".venv-oracle"):
        if (REPO / environment).exists():
            os.symlink((REPO / environment).resolve(), copy / environment)
    if (REPO.parent / "shared").exists():
        os.symlink((REPO.parent / "shared").resolve(), destination / "shared")
    return copy


FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")
PASSED = re.compile(r"^PASSED (\S+)")


def run_tests(copy: Path, tests: Sequence[str], markers: str,
              timeout: int) -> Tuple[List[str], List[str], str, float]:
    """(failing node ids, passing node ids, pytest's summary line, seconds) of ``tests`` run in ``copy``."""
    environment = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    command = [sys.executable, "-m", "pytest", "-q", "-rfEp", "-p", "no:cacheprovider", "-m", markers,
               *[test for test in tests if (copy / test.split("::")[0]).exists()]]
    started = time.time()
    try:
        completed = subprocess.run(command, cwd=copy, env=environment, capture_output=True, text=True, timeout=timeout)
        output = completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        output += f"\nTIMEOUT after {timeout} s"
    failed = sorted({match.group(2) for line in output.splitlines() if (match := FAILED.match(line))})
    passed = sorted({match.group(1) for line in output.splitlines() if (match := PASSED.match(line))})
    summary = next((line for line in reversed(output.splitlines()) if " in " in line and ("passed" in line or "failed" in line
                                                                                          or "error" in line)), output[-300:])
    return failed, passed, summary.strip(), time.time() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    parser.add_argument("--no-oracle", action="store_true", help="skip tests marked oracle")
    parser.add_argument("--tests", nargs="*",
                        help="files or pytest node ids replacing every mutation's test selection")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per mutation")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (their paths are printed)")
    arguments = parser.parse_args(argv)
    mutations = [mutation for mutation in MUTATIONS if not arguments.only or mutation.name in arguments.only]
    if arguments.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name:28} {mutation.bug}\n{'':28} tests: {' '.join(mutation.tests)}")
        return 0
    markers = "not slow and not oracle" if arguments.no_oracle else "not slow"
    package = REPO / "modelscope_plugin"
    # every snippet is checked before anything runs, so a moved or edited line fails fast
    targets = {mutation.name: locate(package, mutation.original) for mutation in mutations}
    survivors = []
    print("| mutation | bug | failing tests | passing tests | pytest summary |\n|---|---|---|---|---|", flush=True)
    for mutation in mutations:
        temporary = Path(tempfile.mkdtemp(prefix=f"mutation_{mutation.name}_"))
        try:
            copy = copy_repository(temporary)
            target = copy / targets[mutation.name].relative_to(REPO)
            source = target.read_text()
            target.write_text(source.replace(mutation.original, mutation.replacement))
            failed, passed, summary, seconds = run_tests(copy, arguments.tests or mutation.tests, markers,
                                                         arguments.timeout)
        finally:
            if arguments.keep:
                print(f"(kept {temporary})", file=sys.stderr)
            else:
                shutil.rmtree(temporary, ignore_errors=True)
        if not failed:
            survivors.append(mutation.name)
        caught = "<br>".join(failed) if failed else "**SURVIVED**"
        print(f"| {mutation.name} | {mutation.bug} | {caught} | {'<br>'.join(passed) or '-'} | {summary} "
              f"({seconds:.0f} s) |", flush=True)
    if survivors:
        print(f"\nsurvived: {', '.join(survivors)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
