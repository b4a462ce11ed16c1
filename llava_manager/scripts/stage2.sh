#!/usr/bin/env bash
# Stage 2 (single-image instruction tuning), +Grid: all parts, AnyRes grid.
# Cluster settings and paths come from the environment: see stage_launch.sh (e.g. DATA=... IMAGES=... llava-manager script stage2).
RECIPE=stage2 PREVIOUS=stage1.5 exec bash "$(dirname "$0")/stage_launch.sh" "$@"
