#!/usr/bin/env bash
# GPU check of issue 28 (item 4): CUDA parity in fp32, then network and end-to-end FPS of Mask2Former Swin-L / R50
# and FastInst R50-D1 / D3 in fp32 / bf16 / fp16, with the targets beside them; all figures also as JSON.
#
#   bash benchmarks/gpu_check.sh                                   # GPU machine; JSON to $OUT/ or ./gpu_check.json
#   bash benchmarks/gpu_check.sh --output /path/gpu_check.json     # any option of benchmarks/gpu_check.py
#   GPU_CHECK_TIMEOUT=0 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu --quick \
#       --compile-precisions fp32                                  # smoke run on a CPU (minutes)
#
# Needs torch (CUDA build), numpy, opencv, scipy and Pillow; transformers optional (parity against it); no
# ModelScope, no network. PYTHON picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
echo "gpu_check: $("$PYTHON" --version 2>&1), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# a hard stop after GPU_CHECK_TIMEOUT seconds (default 470; 0: none): the JSON keeps every step finished before it
exec timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-470}" "$PYTHON" benchmarks/gpu_check.py "$@"
