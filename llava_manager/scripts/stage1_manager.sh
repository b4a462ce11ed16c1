#!/usr/bin/env bash
# Stage 1 (alignment), +Manager: projector + manager, square images, plain prompt.
# Cluster settings and paths come from the environment: see stage_launch.sh (e.g. DATA=... IMAGES=... llava-manager script stage1_manager).
RECIPE=stage1_manager exec bash "$(dirname "$0")/stage_launch.sh" "$@"
