#!/usr/bin/env bash
# MaCSC T+I+A+V vs the text-only baseline on a lent GPU (issue 6): training samples/s and their
# ratio, and peak memory, for a RoBERTa-base-sized backbone with random weights (no download),
# bf16 autocast, eager and with torch.compile. About 2-4 minutes on an H200 (compiling both
# models is most of it); the eager line comes first, so a cut-short run still reports it.
#
#   bash benchmarks/gpu.sh [gpu_step.py options, e.g. --no-compile --rounds 3]
#
# Runs from any folder; needs torch, transformers, lightning and torchmetrics (no open_clip, no
# datasets, no network). Writes gpu.json to $OUT when OUT is set (the lent machine's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
out=()
if [[ -n "${OUT:-}" ]]; then out=(--out "$OUT/gpu.json"); fi
exec timeout 295 "$PYTHON" benchmarks/gpu_step.py "${out[@]}" "$@"
