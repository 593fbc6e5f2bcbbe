# Shared by scripts/test.sh and scripts/demo.sh: make (or reuse) .venv with the kit installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned only here: a bare `torch` requirement on a machine without it would pull a
# multi-GB CUDA build; 2.13.0 is the version the kit is tested with (on a GPU machine pip picks CUDA).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[${KIT_EXTRAS:-dev}]"
