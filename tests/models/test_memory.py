"""The memory estimator: the formula by hand, and the check that refuses and says what fits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.errors import ConfigError
from posttrain.models import memory


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4,
                                        max_position_embeddings=64))


def test_estimate_by_hand(model):
    p = sum(x.numel() for x in model.parameters())
    est = memory.estimate([model], precision="fp32")
    assert est.weights == 4 * p and est.gradients == 4 * p and est.optimizer == 8 * p
    # per token: 3 layers x 32 hidden x 34 x 4/2 bytes + logits 100 x 4 + log-softmax 100 x 8
    assert est.activations_per_token == 3 * 32 * 34 * 2 + 400 + 800
    assert est.total(10) == 16 * p + 10 * (6528 + 1200)
    bf16 = memory.estimate([model], precision="bf16")
    assert bf16.activations_per_token == 3 * 32 * 34 * 1 + 200 + 800
    # checkpointing keeps each layer's input (3 x 32 x 4 bytes) and rebuilds one layer
    ckpt = memory.estimate([model], precision="fp32", checkpointing=True)
    assert ckpt.activations_per_token == 3 * 32 * 4 + 32 * 34 * 2 + 400 + 800
    assert ckpt.static == est.static


def test_frozen_models_count_weights_only_and_shared_parameters_once(model):
    p = sum(x.numel() for x in model.parameters())
    est = memory.estimate([model], [model], "fp32")  # the same weights twice: counted once
    assert est.weights == 4 * p
    frozen = LlamaForCausalLM(model.config).requires_grad_(False)
    est = memory.estimate([model], [frozen], "fp32")
    assert est.weights == 8 * p and est.gradients == 4 * p and est.optimizer == 8 * p


def test_only_trainable_parameters_get_gradients_and_optimiser_state(model):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(LlamaForCausalLM(model.config),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = sum(x.numel() for x in lora.parameters() if x.requires_grad)
    est = memory.estimate([lora], precision="fp32")
    assert est.gradients == 4 * trainable and est.optimizer == 8 * trainable


def test_check_fits_says_what_fits(model):
    est = memory.estimate([model], precision="fp32")
    available = est.static + 1000 * est.activations_per_token + 5
    memory.check_fits(est, 1000, torch.device("cpu"), available)  # fits exactly
    with pytest.raises(ConfigError) as err:
        memory.check_fits(est, 4096, torch.device("cpu"), available)
    msg = str(err.value)
    assert "run.micro_batch_tokens=4096" in msg and "--run.micro_batch_tokens 1000" in msg
    assert est.max_tokens(available) == 1000
    assert est.total(1001) > available
    with pytest.raises(ConfigError, match=r"the models alone need.*lora_r"):
        memory.check_fits(est, 1, torch.device("cpu"), est.static // 2)


def test_trainer_refuses_before_the_first_step(arithmetic_task, tmp_path, monkeypatch):
    from posttrain.config import load_config
    from posttrain.trainers.sft import SFTConfig, SFTTrainer

    cfg = load_config(SFTConfig, overrides={
        "model": {"path": str(arithmetic_task / "model")},
        "data": {"train": str(arithmetic_task / "sft_train.jsonl"), "limit": 16},
        "run": {"output_dir": str(tmp_path), "name": "oom", "steps": 2, "progress": "none",
                "micro_batch_tokens": 1 << 30},
        "eval": {"generate_samples": 0}})
    trainer = SFTTrainer(cfg)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"at most [0-9]+ tokens per micro-batch fit"):
        trainer.train()
    assert trainer.step == 0
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in start.items())
