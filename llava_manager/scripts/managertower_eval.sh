#!/usr/bin/env bash
# Evaluate a fine-tuned ManagerTower checkpoint on its recipe's eval split (one process).
# Usage: llava-manager script managertower_eval RECIPE CHECKPOINT OUTPUT_DIR [--set data.eval=[snli_test] ...]
set -euo pipefail
recipe=${1:?usage: $0 RECIPE CHECKPOINT OUTPUT_DIR [args...]}
checkpoint=${2:?usage: $0 RECIPE CHECKPOINT OUTPUT_DIR [args...]}
output_dir=${3:?usage: $0 RECIPE CHECKPOINT OUTPUT_DIR [args...]}
shift 3
exec "${PYTHON:-python}" -m llava_manager managertower-train --recipe "$recipe" --eval-only --model "$checkpoint" --output-dir "$output_dir" "$@"
