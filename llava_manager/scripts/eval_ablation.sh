#!/usr/bin/env bash
# Evaluate the four ablation variants in one phase, then (after 'local', 'score' or 'tiny') write the report.
#
#   llava-manager script eval_ablation OUT_ROOT PHASE BASELINE_CKPT MANAGER_CKPT GRID_CKPT GRID_MANAGER_CKPT [lmms-eval args...]
#
# The paper's protocol, on a GPU node without network, then on a node with network:
#   llava-manager script eval_ablation runs/eval local   B M G GM
#   llava-manager script eval_ablation runs/eval predict B M G GM
#   llava-manager script eval_ablation runs/eval score   B M G GM      # needs OPENAI_API_KEY; checkpoints are not loaded
# The report (runs/eval/report) reads every phase's results under each variant's directory.
set -euo pipefail
if [ "$#" -lt 6 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
OUT_ROOT=$1; PHASE=$2; shift 2
CHECKPOINTS=("$1" "$2" "$3" "$4"); shift 4
HERE=$(cd "$(dirname "$0")" && pwd)
status=0
for index in 0 1 2 3; do
  variant=(baseline manager grid grid_manager); variant=${variant[$index]}
  echo "== $variant: $PHASE"
  bash "$HERE/eval_variant.sh" "$variant" "${CHECKPOINTS[$index]}" "$OUT_ROOT" "$PHASE" "$@" || status=1
done
if [ "$PHASE" != predict ]; then
  bash "$HERE/eval_report.sh" "$OUT_ROOT" || status=1
fi
exit $status
