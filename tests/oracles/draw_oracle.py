"""Draws masks with ModelScope's own panoptic/semantic drawing functions (they need mmdet 2.x).

Usage: draw_oracle.py MASKS.npz OUT.npz SEED  (MASKS.npz: "masks" uint8 [N, H, W]; N <= 133)
"""
import sys

import mmcv_shim
import numpy as np

mmcv_shim.install()  # mmcv without compiled ops

from modelscope.utils.cv.image_utils import panoptic_seg_masks_to_image, semantic_seg_masks_to_image

masks = list(np.load(sys.argv[1])["masks"])
np.random.seed(int(sys.argv[3]))
panoptic = panoptic_seg_masks_to_image(masks)
semantic = semantic_seg_masks_to_image(masks)
np.savez(sys.argv[2], panoptic=panoptic, semantic=semantic)
