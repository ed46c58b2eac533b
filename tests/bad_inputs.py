"""The README's bad-input table, generated from the cases below; ``tests/test_reliability.py`` runs every case and
checks that the README holds exactly this table. ``python tests/bad_inputs.py`` prints it."""
import io
import json
import pickle
import shutil
import socket
from pathlib import Path
from typing import Callable, List, NamedTuple

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEMO_FASTINST = REPO / "model_cards" / "demo" / "fastinst_synthetic-shapes"
DEMO_MASK2FORMER = REPO / "model_cards" / "demo" / "mask2former_synthetic-shapes"
ANSWERED = "answered"


class Case(NamedTuple):
    input: str
    happens: str
    outcome: str
    """The error type raised, or ``ANSWERED``."""
    run: Callable
    """(segmenter, folder) -> anything; raises the case's error."""


def image_file(folder: Path, name: str, content: bytes) -> str:
    path = folder / name
    path.write_bytes(content)
    return str(path)


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}/image.jpg"


def model_dir_with(folder: Path, change: Callable[[dict], None], weights: bytes = None,
                   source: Path = DEMO_FASTINST) -> Path:
    """A copy of a demo model directory with its configuration.json changed (and its weights replaced)."""
    directory = folder / "model"
    shutil.copytree(source, directory)
    configuration = json.loads((directory / "configuration.json").read_text())
    change(configuration)
    (directory / "configuration.json").write_text(json.dumps(configuration))
    if weights is not None:
        (directory / "pytorch_model.pt").write_bytes(weights)
    return directory


def load(directory) -> None:
    from modelscope_plugin.model_dirs.load import load_model

    load_model(directory)


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def answered_at_size(result, size) -> None:
    assert result["masks"] and all(mask.shape == size for mask in result["masks"])


CASES: List[Case] = [
    Case("missing file", "names the path: does not exist", "ImageInputError",
         lambda segmenter, folder: segmenter(str(folder / "missing.jpg"))),
    Case("empty (0-byte) file", "names the path: is empty", "ImageInputError",
         lambda segmenter, folder: segmenter(image_file(folder, "empty.jpg", b""))),
    Case("truncated JPEG", "names the path: is truncated", "ImageInputError",
         lambda segmenter, folder: segmenter(image_file(folder, "cut.jpg", jpeg_bytes()[:300]))),
    Case("URL nothing answers", "names the URL and the connection error", "ImageInputError",
         lambda segmenter, folder: segmenter(closed_port_url())),
    Case("float array with NaN", "names shape and dtype: contains NaN", "ImageInputError",
         lambda segmenter, folder: segmenter(np.full((8, 8, 3), np.nan, np.float32))),
    Case("(H, W, 2) array", "names the shape and the shapes accepted", "ImageInputError",
         lambda segmenter, folder: segmenter(np.zeros((8, 8, 2), np.uint8))),
    Case("`torch.Tensor`", "names type, shape, dtype; says to convert it", "ImageInputError",
         lambda segmenter, folder: segmenter(torch.zeros(3, 8, 8))),
    Case("100 x 1200 banner (FastInst)", "padded so every query has a pixel; masks at 100 x 1200", ANSWERED,
         lambda segmenter, folder: answered_at_size(segmenter(np.zeros((100, 1200, 3), np.uint8), score_thr=0.0),
                                                    (100, 1200))),
    Case("1 x 5000 image", "masks at 1 x 5000", ANSWERED,
         lambda segmenter, folder: answered_at_size(segmenter(np.zeros((1, 5000, 3), np.uint8), score_thr=0.0),
                                                    (1, 5000))),
    Case("list with a bad item, `on_error=\"return\"`", "an `error` entry for it, the other results intact", ANSWERED,
         lambda segmenter, folder: segmenter([np.zeros((8, 8, 3), np.uint8), "missing.jpg"], on_error="return")),
    Case("configuration.json `object_mask_threshold: \"high\"`", "at load: names file, field and reason",
         "ModelDirError", lambda segmenter, folder: load(model_dir_with(
             folder, lambda values: values["model"]["config"]["inference"].update(object_mask_threshold="high"),
             source=DEMO_MASK2FORMER))),
    Case("configuration.json `size_divisor: 0`", "at load: names file, field and reason", "ModelDirError",
         lambda segmenter, folder: load(model_dir_with(
             folder, lambda values: values["model"]["preprocess"].update(size_divisor=0)))),
    Case("configuration.json `model` not an object", "names the file", "ModelDirError",
         lambda segmenter, folder: load(model_dir_with(folder, lambda values: values.update(model="fastinst")))),
    Case("truncated weights file", "names the file: truncated or corrupt", "CheckpointError",
         lambda segmenter, folder: load(model_dir_with(
             folder, lambda values: None, (DEMO_FASTINST / "pytorch_model.pt").read_bytes()[:5000]))),
    Case("weights file carrying pickled code", "refused; nothing runs", "CheckpointError",
         lambda segmenter, folder: load(model_dir_with(folder, lambda values: None, pickle.dumps(Payload())))),
    Case("Hugging Face `config.json` that is not JSON", "names the file", "CheckpointError",
         lambda segmenter, folder: load(hf_folder(folder))),
]


def hf_folder(folder: Path) -> Path:
    directory = folder / "hf"
    directory.mkdir()
    (directory / "config.json").write_text("{\"num_queries\": ")
    (directory / "model.safetensors").write_bytes(b"")
    return directory


def render_table() -> str:
    rows = ["| input | what happens | error type |", "|---|---|---|"]
    rows += [f"| {case.input} | {case.happens} | {'—' if case.outcome == ANSWERED else f'`{case.outcome}`'} |"
             for case in CASES]
    return "\n".join(rows)


if __name__ == "__main__":
    print(render_table())
