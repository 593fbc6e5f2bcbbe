#!/usr/bin/env bash
# The test suite on a fresh machine: creates .venv, installs the kit, runs pytest (CPU only).
KIT_EXTRAS=${KIT_EXTRAS:-dev,quant}  # the quantized-precision tests need bitsandbytes, quanto, torchao
source "$(dirname "$0")/_env.sh"
python -m pytest -q "$@"
