#!/usr/bin/env bash
# Set up the virtual environment that `make sweep` and `make test` use.
#   - A torch that is already importable in the target environment is left alone (GPU users).
#   - Otherwise, on a machine without an NVIDIA driver, the CPU build of torch is installed first
#     (pinned, so pip never pulls several GB of CUDA packages); override with TORCH_SPEC=...
#   - With a driver present, pip's default torch (CUDA) is used.
# Usage: scripts/install.sh [VENV_DIR]     (USE_CURRENT_ENV=1 installs into the active python)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
if [[ "${USE_CURRENT_ENV:-0}" == "1" ]]; then
  py="$(command -v python3 || command -v python)"
else
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "[install] creating virtual environment $venv"
    python3 -m venv "$venv"
  fi
  py="$venv/bin/python"
fi
pip=("$py" -m pip install --quiet)
if "$py" -c "import torch" 2>/dev/null; then
  echo "[install] keeping the installed torch $("$py" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
  echo "[install] NVIDIA driver found: installing torch with CUDA (${TORCH_SPEC:-torch})"
  "${pip[@]}" "${TORCH_SPEC:-torch}"
else
  echo "[install] no GPU: installing the CPU build of torch (${TORCH_SPEC:-torch==2.13.0})"
  "${pip[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
echo "[install] installing lmm_ray and its dependencies"
"${pip[@]}" -e ".[dev,lmms-eval]"
# lmms-eval, the evaluation backend (lmm_ray/lmms_backend.py): without its own dependency list, which
# would pull torchvision (changes image preprocessing; a CUDA build on some machines), opencv, wandb
# and ~55 more. The `lmms-eval` extra above holds the few it imports, with filelock<4.
echo "[install] installing lmms-eval ${LMMS_EVAL_SPEC:-lmms-eval==0.7.3} (--no-deps)"
"${pip[@]}" --no-deps "${LMMS_EVAL_SPEC:-lmms-eval==0.7.3}"
"$py" -c "import torch, transformers, ray, peft, optuna, mlflow, pandas; print('[install] ok: torch', torch.__version__, '| transformers', transformers.__version__, '| ray', ray.__version__)"
"$py" -c "from lmm_ray import lmms_backend; lmms_backend.require(); from importlib.metadata import version; print('[install] ok: lmms-eval', version('lmms_eval'))"
if "$py" -m pip list 2>/dev/null | grep -q -i -E '^torchvision '; then
  echo "[install] note: torchvision is installed: transformers' image processors then use it (slightly different pixels)"
fi
