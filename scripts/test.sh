#!/usr/bin/env bash
# The test suite on a fresh machine: creates .venv, installs the kit, runs pytest (CPU only), then the
# browser test (JupyterLab in headless Chromium, scripts/browser_test.sh; installs chromium with apt).
# LONGCAT_NB_BROWSER=0 skips the browser test; arguments go to pytest and also skip it.
KIT_EXTRAS=${KIT_EXTRAS:-dev,quant}  # the quantized-precision tests need bitsandbytes, quanto, torchao
source "$(dirname "$0")/_env.sh"
python -m pytest -q -m "not browser" "$@"
if [ "${LONGCAT_NB_BROWSER:-1}" = "1" ] && [ $# -eq 0 ]; then
  bash scripts/browser_test.sh
fi
