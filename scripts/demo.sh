#!/usr/bin/env bash
# The main job on a fresh machine: every notebook headless on the tiny model and data_samples/.
source "$(dirname "$0")/_env.sh"
python -m longcat_nb demo --run-dir "${RUN_DIR:-runs/demo}" "$@"
