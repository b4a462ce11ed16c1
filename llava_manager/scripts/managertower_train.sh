#!/usr/bin/env bash
# Train then evaluate ManagerTower on one task (a recipe of training/managertower/recipes) on every local GPU.
# Usage: llava-manager script managertower_train RECIPE OUTPUT_DIR [--model CHECKPOINT] [--set KEY=VALUE ...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT; DEEPSPEED=zero2 (default) or zero3.
set -euo pipefail
recipe=${1:?usage: $0 RECIPE OUTPUT_DIR [args...]}
output_dir=${2:?usage: $0 RECIPE OUTPUT_DIR [args...]}
shift 2
exec torchrun \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --nproc_per_node "${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}" \
  -m llava_manager managertower-train --recipe "$recipe" --output-dir "$output_dir" --deepspeed "${DEEPSPEED:-zero2}" "$@"
