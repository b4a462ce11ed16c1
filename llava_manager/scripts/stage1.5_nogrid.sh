#!/usr/bin/env bash
# Stage 1.5 (mid-stage), Baseline: all parts, square images.
# Cluster settings and paths come from the environment: see stage_launch.sh (e.g. DATA=... IMAGES=... llava-manager script stage1.5_nogrid).
RECIPE=stage1.5_nogrid PREVIOUS=stage1 exec bash "$(dirname "$0")/stage_launch.sh" "$@"
