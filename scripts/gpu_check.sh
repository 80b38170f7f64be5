#!/usr/bin/env bash
# GPU check (one H200 or any CUDA GPU): plain transformers.Trainer vs LLRDTrainer (layer_decay=0.8, default
# per-depth logging) on MiniLM-L6 and a ViT-B/16-sized model, bf16 and fp16, adamw_torch_fused, 200 steps of
# batch 64, 3 alternating rounds. Writes scripts/results/gpu_check.json (samples/s, peak GPU memory, ratios).
#   bash scripts/gpu_check.sh [extra flags for scripts/gpu_check.py]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python scripts/gpu_check.py "$@"
