#!/usr/bin/env bash
# Every bf16 figure issues 27 and 28 still need, in one run, on a CPU with AMX (about 30-40 minutes on 2 cores):
# the Swin-L and R50 pipelines vs transformers (fp32 and bf16 autocast, with the agreement with fp32), EoMT-L vs
# transformers' EoMT (fp32 and bf16), FastInst R50-D1 / D3 in fp32 and bf16 through the GPU check's CPU mode.
#
#   bash benchmarks/amx_check.sh                      # logs to outputs/amx_check-<date>/
#   AMX_CHECK_FORCE=1 bash benchmarks/amx_check.sh    # on a CPU without AMX (bf16 then runs in slow loops)
#
# Needs `make .venv/.installed .venv-oracle/.installed`. Record the figures in benchmarks/README.md with the
# machine line this script prints first; run nothing else on the machine meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=$(grep -o 'avx512_bf16\|amx_bf16\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ' || true)
model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)
echo "amx_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD), $model, $(nproc) cores, bf16 flags: ${flags:-none}"
if [[ "$flags" != *amx_bf16* && "${AMX_CHECK_FORCE:-0}" != 1 ]]; then
    echo "this CPU has no amx_bf16 in /proc/cpuinfo: the bf16 timings would measure oneDNN's slow loops" >&2
    exit 2
fi
output="outputs/amx_check-$(date -u +%Y%m%d-%H%M)"
mkdir -p "$output"
step() {  # name, command...: runs it, its output to the terminal and to $output/name.log
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$output/$name.log"
}
step swin-l .venv-oracle/bin/python benchmarks/pipeline_speed.py --backbone swin-l --runs 3 --bf16 yes
step r50 .venv-oracle/bin/python benchmarks/pipeline_speed.py --backbone r50 --runs 3 --bf16 yes
step eomt .venv-oracle/bin/python benchmarks/eomt_speed.py --runs 3 --bf16
step fastinst env GPU_CHECK_TIMEOUT=0 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu \
    --models fastinst-r50-d1,fastinst-r50-d3 --parity-models fastinst-r50-d3 --compile none \
    --output "$output/fastinst.json"
echo "logs in $output"
