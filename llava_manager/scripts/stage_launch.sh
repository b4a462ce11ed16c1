#!/usr/bin/env bash
# Launch one training stage: `RECIPE=<name> [PREVIOUS=<recipe>] llava-manager script stage_launch [extra options]`.
# The stage* scripts set RECIPE and PREVIOUS; everything else comes from the environment:
#   NNODES (1)  NPROC_PER_NODE (GPUs on this node, else 1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   CHECKPOINTS (checkpoints)  MODEL (${CHECKPOINTS}/${PREVIOUS}; stage 1: ${CHECKPOINTS}/stage0, as stage0.sh writes it)
#   OUTPUT (${CHECKPOINTS}/${RECIPE})
#   DATA (required: json / jsonl / mixture yaml)  IMAGES (image folder)  DEEPSPEED (zero2 | zero3 | path | none)
#   PYTHON (python)
# Extra options go to `llava-manager train` (any TrainingArguments field, e.g. --max_steps 10).
set -euo pipefail

: "${RECIPE:?set RECIPE to a recipe name (llava-manager train --help lists them)}"
CHECKPOINTS="${CHECKPOINTS:-checkpoints}"
MODEL="${MODEL:-${CHECKPOINTS}/${PREVIOUS:-stage0}}"  # stage 1 (no PREVIOUS) starts from stage 0's model
: "${DATA:?set DATA to the training data: LLaVA json / jsonl, or a mixture yaml}"
OUTPUT="${OUTPUT:-${CHECKPOINTS}/${RECIPE}}"
DEEPSPEED="${DEEPSPEED:-zero2}"
NNODES="${NNODES:-1}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)"
    [[ "${NPROC_PER_NODE}" -gt 0 ]] || NPROC_PER_NODE=1
fi
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"

ARGS=(--recipe "${RECIPE}" --model_name_or_path "${MODEL}" --data_path "${DATA}" --output_dir "${OUTPUT}")
[[ -n "${IMAGES:-}" ]] && ARGS+=(--image_folder "${IMAGES}")
[[ "${DEEPSPEED}" != "none" ]] && ARGS+=(--deepspeed "${DEEPSPEED}")

exec "${PYTHON}" -m torch.distributed.run \
    --nnodes "${NNODES}" --nproc_per_node "${NPROC_PER_NODE}" --node_rank "${NODE_RANK}" \
    --master_addr "${MASTER_ADDR}" --master_port "${MASTER_PORT}" \
    -m llava_manager train "${ARGS[@]}" "$@"
