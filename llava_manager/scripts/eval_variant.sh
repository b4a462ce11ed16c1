#!/usr/bin/env bash
# Evaluate one ablation variant's checkpoint in one phase of the paper's protocol.
#
#   llava-manager script eval_variant VARIANT CHECKPOINT OUT_ROOT PHASE [extra lmms-eval args...]
#
# VARIANT   baseline | manager | grid | grid_manager   (grid and grid_manager evaluate with AnyRes grids)
# PHASE     local    the 13 locally scored tasks (manager_local13)
#           predict  phase 1 of the 7 judge tasks (manager_api7): answers only, logged; no network needed
#           score    phase 2: the judge scores the logged answers of OUT_ROOT/VARIANT/predict; needs network and
#                    OPENAI_API_KEY (and API_TYPE, e.g. openai or azure)
#           tiny     the package's offline task (manager_tiny, manager_tiny_mc)
# Results: OUT_ROOT/VARIANT/PHASE/results.json. Environment: NUM_PROCESSES (GPUs, default 1), BATCH_SIZE (default 1),
# PYTHON (default python).
set -euo pipefail
if [ "$#" -lt 4 ]; then
  sed -n '2,16p' "$0"; exit 2
fi
VARIANT=$1; CHECKPOINT=$2; OUT_ROOT=$3; PHASE=$4; shift 4
PYTHON=${PYTHON:-python}
case "$VARIANT" in
  baseline|manager) GRID=false ;;
  grid|grid_manager) GRID=true ;;
  *) echo "unknown variant '$VARIANT': expected baseline, manager, grid or grid_manager" >&2; exit 2 ;;
esac
OUT="$OUT_ROOT/$VARIANT/$PHASE"
MODEL=(--model llava_ov_manager --model_args "pretrained=$CHECKPOINT,grid=$GRID")
COMMON=(--batch_size "${BATCH_SIZE:-1}" --num_processes "${NUM_PROCESSES:-1}" --output_path "$OUT" --log_samples)
case "$PHASE" in
  local)
    TASKS=(--tasks manager_local13) ;;
  predict)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    # lmms-eval 0.7.3's judge tasks build their API client when their code is imported, even to only predict.
    export OPENAI_API_KEY=${OPENAI_API_KEY:-unused-in-predict-only}
    TASKS=(--tasks manager_api7 --predict_only) ;;
  score)
    if [ -z "${OPENAI_API_KEY:-}" ]; then echo "phase 'score' calls the judge: set OPENAI_API_KEY" >&2; exit 2; fi
    MODEL=(--model llava_ov_manager_replay --model_args "predictions=$OUT_ROOT/$VARIANT/predict")
    TASKS=(--tasks manager_api7) ;;
  tiny)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    TASKS=(--tasks manager_tiny,manager_tiny_mc) ;;
  *) echo "unknown phase '$PHASE': expected local, predict, score or tiny" >&2; exit 2 ;;
esac
exec "$PYTHON" -m llava_manager eval run "${MODEL[@]}" "${TASKS[@]}" "${COMMON[@]}" "$@"
