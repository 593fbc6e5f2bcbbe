#!/usr/bin/env bash
# The browser test on a fresh Debian machine: JupyterLab on localhost, the five notebooks run cell by
# cell in headless Chromium on the tiny model (tests/browser). Installs the system chromium (apt; sudo
# only when not root) and the kit with its dev and browser extras into .venv; playwright drives that
# chromium, so no browser is downloaded. Screenshots, logs and timings.json land in browser-artifacts/.
# Set LONGCAT_NB_CHROMIUM to use another Chromium/Chrome binary (e.g. on Ubuntu, where apt's chromium is a snap).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LONGCAT_NB_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "no chromium on PATH and no apt-get to install it: install Chromium and set LONGCAT_NB_CHROMIUM" >&2
    exit 1
  fi
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-dejavu-core
fi
KIT_EXTRAS=${KIT_EXTRAS:-dev,browser}
source scripts/_env.sh
export LONGCAT_NB_BROWSER_REQUIRED=1  # everything is installed now: a skip would hide a problem, so fail instead
start=$(date +%s)
rc=0
python -m pytest tests/browser -m browser -v -rs --durations=3 "$@" || rc=$?
[ -f browser-artifacts/timings.json ] && { cat browser-artifacts/timings.json; echo; }
echo "browser test: exit code $rc, wall time $(( $(date +%s) - start ))s; artifacts in browser-artifacts/"
exit $rc
