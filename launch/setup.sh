#!/usr/bin/env bash
# Create (or reuse) .venv in the repository root and install kd with its pinned dependencies.
# Idempotent: a second run only checks that everything is installed.
#   bash launch/setup.sh            # CPU machine: torch 2.13.0 (a CPU build where the local index has one)
#   TORCH_SPEC="torch==2.11.0" bash launch/setup.sh   # keep a different torch (e.g. a CUDA build)
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  pip install -q "$TORCH_SPEC"
fi
if ! python -c "import kd, torchtune, torchao, peft, omegaconf, transformers, dashscope, matplotlib" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.kd-installed ] || [ kd_recipes_hook.py -nt .venv/.kd-installed ]; then
  echo "[setup] installing kd (editable) with test extras"
  pip install -q -e ".[test]"
  touch .venv/.kd-installed
fi
python - <<'PY'
import torch, torchtune, torchao
print(f"[setup] ok: torch {torch.__version__}, torchtune {torchtune.__version__}, torchao {torchao.__version__}")
PY
