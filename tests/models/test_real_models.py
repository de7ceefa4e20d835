"""Issue 20 on real architectures (tiny GPT-2, Qwen2, Mistral, posttrain.tasks.archs): reward
models with LoRA, saved reward models that score the same in plain `transformers`, a critic
that must share the policy's tokenizer, LoRA without warnings, adapters that load anywhere."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.models.load import check_same_tokenizer, load_tokenizer
from posttrain.trainers.reward import RewardModelTrainer, RMConfig
from tests.conftest import QUIET

PAIRS = [("what is 3 + 4?", " 7.", " the answer is 9."),
         ("what is 12 - 5?", " 7.", " please answer."),
         ("compute 6 * 7 =", " 42.", " 24."),
         ("the quick brown fox", " jumps.", " dog dog dog."),
         ("what is 2 + 2?", " 4.", " 5."),
         ("a helpful answer is", " short and true.", " long.")]


def train_rm(model_dir, tmp_path, name, **over):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in PAIRS))
    cfg = load_config(RMConfig, overrides={
        "model": {"path": str(model_dir), **over.get("model", {})},
        "data": {"train": str(data), "eval_fraction": 0},
        "optim": {"lr": 1e-3},
        "run": {**QUIET["run"], "output_dir": str(tmp_path), "name": name, "steps": 3,
                "batch_size": 4}})
    trainer = RewardModelTrainer(cfg)
    result = trainer.train()
    return trainer, result.final_dir


def plain_scores(final_dir, ids):
    """Scores as a user of plain transformers (or TRL) gets them: `ids` right-padded by the
    tokenizer (its pad, else the EOS as TRL sets it), pooled by the model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final_dir)
    model = AutoModelForSequenceClassification.from_pretrained(final_dir).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    batch = tok.pad({"input_ids": ids}, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0], json.loads((final_dir / "config.json").read_text())


def posttrain_scores(final_dir, prompts, responses):
    from posttrain.models.load import load_reward_model
    from posttrain.rewards.model import RewardModelReward

    model = load_reward_model(final_dir).eval()
    reward = RewardModelReward(model, load_tokenizer(final_dir))
    return torch.tensor(reward(prompts, responses)), reward.encode(prompts, responses)


# the parameter that carries the offset, by its name in the backbone
FOLDED = {"gpt2": "ln_f.bias", "opt": "decoder.final_layer_norm.bias"}


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "mistral", "opt"])
def test_a_lora_reward_model_trains_and_plain_transformers_scores_it_the_same(arch,
                                                                             arch_model,
                                                                             tmp_path,
                                                                             capsys):
    """LoRA on a reward model used to crash in every architecture. Trained, merged and saved,
    its scores in plain transformers (pooling at the last non-pad token, no offset) equal
    posttrain's: the offset is folded into the final LayerNorm's bias (GPT-2, OPT: OPT's is
    not the last LayerNorm it registers) or, where no bias can carry it (RMSNorm: Qwen2,
    Mistral), is the one difference, config.json's reward_offset, and the run says so."""
    trainer, final = train_rm(arch_model(arch), tmp_path, "rm", model={"lora_r": 4})
    assert hasattr(trainer.model, "peft_config")
    said = capsys.readouterr().out
    folded = arch in FOLDED
    assert (f"folded into {FOLDED[arch]}," in said if folded else
            "kept as config.json's reward_offset" in said), said
    prompts = [p for p, _, _ in PAIRS] * 2
    responses = [c for _, c, _ in PAIRS] + [r for _, _, r in PAIRS]
    ours, ids = posttrain_scores(final, prompts, responses)
    assert len({len(i) for i in ids}) > 1  # the batch is padded
    theirs, config = plain_scores(final, ids)  # prompt + response + EOS, as posttrain encodes
    offset = config.get("reward_offset", 0.0)
    assert (offset == 0.0) == folded, offset
    torch.testing.assert_close(theirs - offset, ours, atol=1e-5, rtol=0)
    # the offset is the mean training-response score: under posttrain's scoring (and, where
    # folded, plain transformers') the training responses now average 0
    assert abs(float(ours.mean())) < 1e-4, ours
    assert abs(offset) > 1e-3 or folded  # not 0 by accident: it was measured


@pytest.mark.parametrize("arch", ["gpt2", "mistral"])
def test_posttrain_reads_the_score_where_transformers_does_when_pad_is_eos(arch, arch_model,
                                                                          tmp_path):
    """GPT-2's and Mistral's pad is their EOS: transformers pools at the last token that is
    not the pad, so the token before the EOS; posttrain reads the same position (it read the
    EOS before). A full fine-tune, so the offset is folded into GPT-2's own weights."""
    _, final = train_rm(arch_model(arch), tmp_path, "rm-full")
    prompts, responses = ["what is 3 + 4?", "hi", "a"], [" 7.", " the answer is 9.", " b"]
    ours, ids = posttrain_scores(final, prompts, responses)
    theirs, config = plain_scores(final, ids)
    offset = config.get("reward_offset", 0.0)
    assert (offset == 0.0) == (arch == "gpt2")
    torch.testing.assert_close(theirs - offset, ours, atol=1e-5, rtol=0)


def test_a_critic_from_a_model_with_another_tokenizer_is_refused(arch_model):
    qwen = load_tokenizer(arch_model("qwen2"))
    with pytest.raises(ConfigError, match="has another tokenizer than the policy"):
        check_same_tokenizer(qwen, arch_model("mistral"), "critic's start model")
    check_same_tokenizer(qwen, arch_model("qwen2"), "critic's start model")  # the same: fine


def test_a_critic_with_a_smaller_vocabulary_is_refused_and_no_tokenizer_is_not_another(
        arch_model, tmp_path):
    import shutil

    src = arch_model("qwen2")
    qwen = load_tokenizer(src)
    bare = tmp_path / "bare"  # the model without tokenizer files: the size is all to check
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, bare / name)
    check_same_tokenizer(qwen, bare, "critic's start model")
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "vocab_size": len(qwen) - 1}))
    with pytest.raises(ConfigError, match=rf"vocabulary of {len(qwen) - 1} tokens but the "
                                          rf"policy's tokenizer at {src} has {len(qwen)}"):
        check_same_tokenizer(qwen, bare, "critic's start model")


def test_ppo_refuses_a_critic_started_from_a_reward_model_with_another_tokenizer(arch_model,
                                                                                tmp_path):
    from posttrain import pipeline
    from posttrain.config import merge
    from posttrain.trainers.rl import RLConfig, RLTrainer

    policy, rm = arch_model("qwen2"), arch_model("mistral")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _, _ in PAIRS))
    cfg = load_config(RLConfig, overrides=merge(pipeline.load_preset("ppo"), {
        "model": {"path": str(policy)},
        "data": {"train": str(data), "eval_fraction": 0},
        "reward": {"terms": [{"name": "reward_model", "path": str(rm)}]},
        "run": {**QUIET["run"], "output_dir": str(tmp_path), "name": "ppo", "steps": 1}}))
    with pytest.raises(ConfigError) as err:
        RLTrainer(cfg)
    message = str(err.value)
    assert "\n" not in message and str(rm) in message and str(policy) in message, message


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_lora_loads_and_trains_without_deprecation_or_fan_in_warnings(arch, arch_model):
    from posttrain.models.load import LoraSpec, load_causal_lm

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_causal_lm(arch_model(arch), lora=LoraSpec(r=4))
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
        out.logits.float().mean().backward()
    said = [str(w.message) for w in caught]
    assert not [m for m in said if "is_gradient_checkpointing" in m or "fan_in_fan_out" in m], \
        said


# peft's own AutoPeftModel (the user's call here, not posttrain's) reads the deprecated name
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_a_saved_adapter_loads_with_autopeft_from_any_directory(arch_model, tmp_path,
                                                               monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from posttrain.models.load import LoraSpec, load_causal_lm, save_model

    base = tmp_path / "models" / "qwen2"
    import shutil

    shutil.copytree(arch_model("qwen2"), base)
    monkeypatch.chdir(tmp_path)
    model = load_causal_lm("models/qwen2", lora=LoraSpec(r=4))  # a relative path, as users do
    save_model(model, tmp_path / "out" / "final")
    monkeypatch.chdir(tmp_path / "out")  # elsewhere: models/qwen2 does not resolve here
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out" / "final" / "adapter")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
