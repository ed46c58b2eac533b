"""Writes the state-dict layout (key -> shape) and the flattened config of mmdet 2.x's own Mask2Former configs.

Usage: mmdet_keys_oracle.py OUT_DIR CONFIG_NAME [CONFIG_NAME ...]
For each bundled config (e.g. mask2former_swin-l-p4-w12-384-in21k_lsj_16x1_100e_coco-panoptic.py) it writes
OUT_DIR/<name>/config.py (mmcv's pretty text, no _base_) and OUT_DIR/<name>/shapes.json, from the detector
mmdet builds (no pretrained download, no forward).
"""
import json
import sys
from pathlib import Path

import mmcv_shim

mmcv_shim.install()

import mmdet  # noqa: E402
from mmcv import Config  # noqa: E402
from mmdet.models import build_detector  # noqa: E402

config_root = Path(mmdet.__file__).parent / ".mim" / "configs" / "mask2former"
out_dir = Path(sys.argv[1])
for name in sys.argv[2:]:
    config = Config.fromfile(str(config_root / name))
    config.model.backbone.init_cfg = None
    config.model.backbone.pop("pretrained", None)
    detector = build_detector(config.model)
    target = out_dir / Path(name).stem
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.py").write_text(config.pretty_text)
    shapes = {key: list(value.shape) for key, value in detector.state_dict().items()}
    (target / "shapes.json").write_text(json.dumps(shapes))
    print(name, len(shapes), "entries")
