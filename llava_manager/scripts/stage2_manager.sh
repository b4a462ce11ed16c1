#!/usr/bin/env bash
# Stage 2 (single-image instruction tuning), +Grid+Manager: all parts, AnyRes grid.
# Cluster settings and paths come from the environment: see stage_launch.sh (e.g. DATA=... IMAGES=... llava-manager script stage2_manager).
RECIPE=stage2_manager PREVIOUS=stage1.5_manager exec bash "$(dirname "$0")/stage_launch.sh" "$@"
