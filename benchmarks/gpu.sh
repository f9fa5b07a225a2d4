#!/usr/bin/env bash
# The GPU checks, in one script for a lent GPU (4.6 minutes on an H200 on 2026-11-30, before the
# graphed mode; expect ~7 now; the parts' timeouts add up to 590 s, under a 10-minute run):
#  1. the CUDA-only tests (pinned prototype batches, bf16 cache storage, probes on cuda, the
#     CUDA graphs of model.compile_after_backbone through Lightning);
#  2. MaCSC T+I+A+V vs the text-only baseline (issues 6, 20): training samples/s, their ratio and
#     peak memory for a RoBERTa-base-sized backbone with random weights (no download), bf16
#     autocast, batch 32 x 128, in three modes: eager, compiled (torch.compile of forward and
#     losses), graphed (what runs after the backbone in CUDA graphs, mode="reduce-overhead");
#     then a BERT-base-sized one, eager and graphed; each line names its mode;
#  3. one CommonGen step of a T5-large-sized model under Lightning's FSDP in bf16, then beam
#     search (benchmarks/fsdp_t5.py).
#
#   bash benchmarks/gpu.sh [gpu_step.py options for the RoBERTa run, e.g. --modes eager --rounds 3]
#
# Runs from any folder; needs torch, transformers, lightning and torchmetrics (no datasets, no
# network). Writes gpu.json, gpu_bert.json and fsdp_t5.json to $OUT when OUT is set (the lent
# machine's folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
out=() bert_out=() fsdp_out=()
if [[ -n "${OUT:-}" ]]; then
    out=(--out "$OUT/gpu.json") bert_out=(--out "$OUT/gpu_bert.json")
    fsdp_out=(--out "$OUT/fsdp_t5.json")
fi
status=0
timeout 110 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or pinned or auto_stores" \
    tests/prototypes/test_storage.py tests/analysis/test_probes.py \
    tests/training/test_compile_option.py || status=1
timeout 250 "$PYTHON" benchmarks/gpu_step.py "${out[@]}" "$@" || status=1
timeout 120 "$PYTHON" benchmarks/gpu_step.py --bert --modes eager,graphed --rounds 3 \
    "${bert_out[@]}" || status=1
timeout 110 "$PYTHON" benchmarks/fsdp_t5.py "${fsdp_out[@]}" || status=1
exit $status
