#!/usr/bin/env bash
# Stage 1.5 (mid-stage), +Grid+Manager: all parts, AnyRes grid.
# Cluster settings and paths come from the environment: see stage_launch.sh (e.g. DATA=... IMAGES=... llava-manager script stage1.5_manager).
RECIPE=stage1.5_manager PREVIOUS=stage1_manager exec bash "$(dirname "$0")/stage_launch.sh" "$@"
