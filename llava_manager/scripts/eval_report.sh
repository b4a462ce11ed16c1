#!/usr/bin/env bash
# The ablation table and plot from the results under OUT_ROOT/{baseline,manager,grid,grid_manager}.
#
#   llava-manager script eval_report OUT_ROOT [REPORT_DIR]      (default REPORT_DIR: OUT_ROOT/report)
set -euo pipefail
if [ "$#" -lt 1 ]; then
  sed -n '2,4p' "$0"; exit 2
fi
OUT_ROOT=$1; REPORT=${2:-$OUT_ROOT/report}
RUNS=()
for variant in baseline manager grid grid_manager; do
  if [ -d "$OUT_ROOT/$variant" ]; then RUNS+=("$variant=$OUT_ROOT/$variant"); fi
done
exec "${PYTHON:-python}" -m llava_manager eval report "${RUNS[@]}" --out "$REPORT"
