#!/usr/bin/env bash
# The environment's lock, checked against upstream. Both modes build a throwaway venv from pyproject.toml's ranges
# alone (the newest versions they allow; torch as TORCH_SPEC says), install the project, and run the whole suite:
#   bash scripts/lock.sh drift     report whether today's upstream releases still pass (writes nothing)
#   bash scripts/lock.sh refresh   the same, then, only if the suite passed, write requirements/lock.txt from it
# `make drift` / `make lock` call this. The suite's `lock` tests (which compare the environment with the current
# lock) are deselected here: this environment is meant to differ.
set -euo pipefail
mode=${1:-}
if [[ $mode != drift && $mode != refresh ]]; then
    echo "usage: bash scripts/lock.sh drift|refresh" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
LOCK=requirements/lock.txt
work=$(mktemp -d "${TMPDIR:-/tmp}/llava-manager-$mode.XXXXXX")
trap 'rm -rf "$work"' EXIT
py=$work/venv/bin/python

step() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
step "throwaway environment in $work (from pyproject.toml's ranges)"
"$PYTHON" -m venv "$work/venv"
"$py" -m pip install --quiet --upgrade pip setuptools
# shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
"$py" -m pip install --quiet $TORCH_SPEC
DS_BUILD_OPS=0 "$py" -m pip install --quiet -e ".[dev]"
"$py" -m pip check
"$py" -m pip freeze --all --exclude-editable | LC_ALL=C sort -f > "$work/resolved.txt"

step "what differs from $LOCK (< locked, > resolved today)"
diff <(grep -v '^#' "$LOCK" | LC_ALL=C sort -f) "$work/resolved.txt" || true

step "the suite in that environment"
if ! OMP_NUM_THREADS=1 "$py" -m pytest -q -m "not lock and not rehearsal"; then
    step "FAILED: upstream releases allowed by pyproject.toml break the suite; $LOCK is unchanged"
    exit 1
fi
if [[ $mode == refresh ]]; then
    {
        echo "# The environment \`make\` builds: every package at the version the whole suite passed with."
        echo "# Written by \`make lock\` (scripts/lock.sh) on $(date -u +%Y-%m-%d) with Python $("$py" -c 'import platform; print(platform.python_version())'); do not edit by hand."
        cat "$work/resolved.txt"
    } > "$work/lock.txt"
    mv "$work/lock.txt" "$LOCK"
    step "suite passed: wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
else
    step "suite passed with today's upstream releases"
fi
