#!/usr/bin/env bash
# The test suite on a fresh machine: creates .venv, installs the kit, runs pytest (CPU only).
source "$(dirname "$0")/_env.sh"
python -m pytest -q "$@"
