#!/usr/bin/env bash
# Installs TRL in virtual environments of its own, beside (never inside) posttrain's .venv, so
# the benchmark can run both libraries on the same machine, model and data.
#
#   benchmarks/.venv-trl      trl 1.16.0 (latest): SFT, reward model, DPO, GRPO
#   benchmarks/.venv-trl-ppo  trl 1.12.0: the last release with a PPO trainer
#                             (trl.experimental.ppo; it was removed in 1.13)
#
# torch is pinned first (the CPU build on this machine; a bare `torch` requirement would pull a
# multi-GB CUDA build), and transformers/accelerate/datasets to the versions posttrain's .venv
# uses, so the comparison is of the trainers, not of the libraries under them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.23.0}"
ACCELERATE_VERSION="${ACCELERATE_VERSION:-1.15.0}"
DATASETS_VERSION="${DATASETS_VERSION:-5.2.0}"

make_venv() {  # make_venv DIR TRL_VERSION
  local dir="$1" trl="$2"
  if [ -f "$dir/.installed-$trl" ]; then echo "$dir: trl $trl already installed"; return; fi
  test -x "$dir/bin/python" || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip
  "$dir/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
  "$dir/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "trl==$trl" \
      "transformers==$TRANSFORMERS_VERSION" "accelerate==$ACCELERATE_VERSION" \
      "datasets==$DATASETS_VERSION" psutil
  touch "$dir/.installed-$trl"
  echo "$dir: trl $trl installed"
}

make_venv "$here/.venv-trl" 1.16.0
make_venv "$here/.venv-trl-ppo" 1.12.0
