#!/usr/bin/env bash
# Stage 0: assemble the LLaVA-OneVision that stage 1 starts from, out of a SigLIP and a Qwen2 checkpoint (local dirs):
#   VISION=ckpt/siglip-so400m-patch14-384 LLM=ckpt/Qwen2-0.5B-Instruct llava-manager script stage0 [--grid 1x1..6x6]
# Environment: VISION, LLM (required)  CHECKPOINTS (checkpoints)  OUTPUT (${CHECKPOINTS}/stage0, where stage1*.sh
# look by default)  PYTHON (python). Extra options go to `python -m llava_integration.assemble`.
set -euo pipefail

: "${VISION:?set VISION to a SigLIP directory (SiglipModel or SiglipVisionModel)}"
: "${LLM:?set LLM to a Qwen2 causal LM directory with its tokenizer}"
CHECKPOINTS="${CHECKPOINTS:-checkpoints}"
OUTPUT="${OUTPUT:-${CHECKPOINTS}/stage0}"
PYTHON="${PYTHON:-python}"

exec "${PYTHON}" -m llava_integration.assemble --vision "${VISION}" --llm "${LLM}" "$@" "${OUTPUT}"
