#!/usr/bin/env bash
# Creates .venv with hardbatch, its dev tools and the trainer integrations' extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() {
  # This machine's pip config names local indexes that may not exist: drop that noise only.
  .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Without a GPU, pin the CPU build first: an open `torch` requirement can pull a multi-GB CUDA
  # build. Set HARDBATCH_TORCH to choose another (e.g. "torch" on a CUDA machine).
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    default_torch="torch"
  else
    default_torch="torch==2.13.0"
  fi
  pip install "${HARDBATCH_TORCH:-$default_torch}"
fi
stamp=.venv/.hardbatch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip install -e '.[dev,lightning,transformers]'
  touch "$stamp"
fi
