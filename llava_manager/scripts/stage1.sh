#!/usr/bin/env bash
# Stage 1 (alignment): projector, square images, plain prompt.
# Cluster settings and paths come from the environment: see stage_launch.sh (e.g. DATA=... IMAGES=... llava-manager script stage1).
RECIPE=stage1 exec bash "$(dirname "$0")/stage_launch.sh" "$@"
