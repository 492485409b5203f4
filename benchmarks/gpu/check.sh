#!/usr/bin/env bash
# The GPU check (see check.py): one GPU, under five minutes, nothing downloaded.
#   benchmarks/gpu/check.sh                 # CUDA; results in $OUT, else ./gpu-check
#   benchmarks/gpu/check.sh --device cpu --quick
set -euo pipefail
cd "$(dirname "$0")/../.."
# the project's venv when there is one; otherwise the python on PATH must have vkd installed
if [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
device_given=0
for arg in "$@"; do
    case "$arg" in --device|--device=*) device_given=1 ;; esac
done
if [ "$device_given" = 0 ]; then
    set -- --device cuda "$@"
fi
# five minutes of work at most; the kill leaves what was written so far in the output folder
exec timeout --kill-after=10 300 python benchmarks/gpu/check.py "$@"
