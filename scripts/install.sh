#!/usr/bin/env bash
# Installs vllm-specextend with the vLLM build for this machine.
# Usage: bash scripts/install.sh [extra ...]   e.g. bash scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras+=(gpu)
else
  extras+=(cpu)
fi
extras+=("$@")
joined=$(IFS=,; echo "${extras[*]}")
python -m pip install --quiet -e ".[${joined}]"
if [[ " ${extras[*]} " == *" cpu "* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec do not load beside torch 2.13.0+cpu
  # ("operator torchvision::nms does not exist"); text models do not need them.
  python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
