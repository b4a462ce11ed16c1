#!/usr/bin/env bash
# Stage 2 (single-image instruction tuning), +Manager: all parts, square images.
# Cluster settings and paths come from the environment: see stage_launch.sh (e.g. DATA=... IMAGES=... llava-manager script stage2_manager_nogrid).
RECIPE=stage2_manager_nogrid PREVIOUS=stage1.5_manager_nogrid exec bash "$(dirname "$0")/stage_launch.sh" "$@"
