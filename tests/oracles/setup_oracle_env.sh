#!/usr/bin/env bash
# Builds the test-only oracle environment (.venv-oracle) on top of the runtime one (.venv).
#
# The oracle venv sees the runtime venv's packages (torch, modelscope, ...) through a .pth
# file, so torch is installed once, and adds the reference implementations the parity tests
# compare against: mmcv 1.7.2 built without compiled ops + mmdet 2.28.2 (the network behind
# the Swin-L hub checkpoints and ModelScope's built-in pipelines), pai-easycv 0.11.7 (the r50
# id's code), transformers (Mask2FormerForUniversalSegmentation, OneFormer, EoMT) and open_clip (CLIP's tokenizer).
set -euo pipefail
runtime=${1:-.venv}
oracle=${2:-.venv-oracle}
python_bin=$(readlink -f "$runtime/bin/python")
"$python_bin" -m venv --without-pip "$oracle" 2>/dev/null || "$python_bin" -m venv "$oracle"
runtime_site=$(cd "$runtime" && pwd)/lib/python3.11/site-packages
oracle_site=$("$oracle/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$runtime_site" > "$oracle_site/_runtime_venv.pth"
pip_oracle() { "$oracle/bin/python" -m pip "$@"; }
# pip itself comes from the runtime venv through the .pth file.
pip_oracle install -q --upgrade "setuptools<70" wheel
MMCV_WITH_OPS=0 pip_oracle install -q --no-build-isolation "mmcv==1.7.2"
pip_oracle install -q --no-deps "mmdet==2.28.2" "pai-easycv==0.11.7"
pip_oracle install -q terminaltables "transformers>=4.40" pytorch-metric-learning jsonplus json_tricks future \
    prettytable fvcore timm yapf==0.40.1 six matplotlib einops  # six, matplotlib: mmdet imports them; einops: easycv
# open_clip ships CLIP's BPE vocabulary and CLIP's own tokenizer (OneFormer's task tokens are checked against both)
pip_oracle install -q --no-deps open_clip_torch ftfy wcwidth
