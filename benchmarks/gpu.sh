#!/usr/bin/env bash
# The GPU checks, in one script for a lent GPU (4.6 minutes on an H200, 2026-11-30):
#  1. the CUDA-only tests (pinned prototype batches, bf16 cache storage, probes on cuda);
#  2. MaCSC T+I+A+V vs the text-only baseline (issue 6): training samples/s, their ratio and peak
#     memory for RoBERTa-base-sized and BERT-base-sized backbones with random weights (no
#     download), bf16 autocast, eager and with torch.compile; the eager line comes first;
#  3. one CommonGen step of a T5-large-sized model under Lightning's FSDP in bf16, then beam
#     search (benchmarks/fsdp_t5.py).
#
#   bash benchmarks/gpu.sh [gpu_step.py options, e.g. --no-compile --rounds 3]
#
# Runs from any folder; needs torch, transformers, lightning and torchmetrics (no datasets, no
# network). Writes gpu.json and fsdp_t5.json to $OUT when OUT is set (the lent machine's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
out=() fsdp_out=()
if [[ -n "${OUT:-}" ]]; then out=(--out "$OUT/gpu.json"); fsdp_out=(--out "$OUT/fsdp_t5.json"); fi
status=0
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or pinned or auto_stores" \
    tests/prototypes/test_storage.py tests/analysis/test_probes.py || status=1
timeout 240 "$PYTHON" benchmarks/gpu_step.py "${out[@]}" "$@" || status=1
timeout 240 "$PYTHON" benchmarks/gpu_step.py --bert --no-compile --rounds 3 || status=1
timeout 180 "$PYTHON" benchmarks/fsdp_t5.py "${fsdp_out[@]}" || status=1
exit $status
