"""Loading policy, reference, reward model and critic; scores, values and LoRA references."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.testing import assert_close

from posttrain.data.collate import pad
from posttrain.errors import ConfigError
from posttrain.models.forward import (
    response_logprobs,
    response_values,
    sequence_scores,
    token_values,
)
from posttrain.models.load import (
    AdapterDisabledReference,
    LoraSpec,
    backbone,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_critic,
    load_reference,
    load_reward_model,
    load_tokenizer,
    max_positions,
    save_model,
    value_head,
)


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    torch.manual_seed(0)
    model = load_reward_model(tiny_model_dir)  # causal-LM checkpoint: backbone + fresh head
    with torch.no_grad():
        value_head(model).weight.normal_()
    return model.eval()


def test_reward_model_scores_at_last_real_token_whatever_the_padding(reward_model, tiny_tokenizer):
    tok = tiny_tokenizer
    seqs = [[*tok("12+3=15").input_ids, tok.eos_token_id], tok("4=4").input_ids]
    alone = torch.stack([
        sequence_scores(reward_model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.bool))[0]
        for s in seqs
    ])
    for side in ("right", "left"):
        ids = pad(seqs, tok.pad_token_id, side=side)
        mask = pad([[1] * len(s) for s in seqs], 0, side=side).bool()
        assert_close(sequence_scores(reward_model, ids, mask), alone, atol=1e-5, rtol=0)
    # the score is the head applied to the last hidden state of the sequence
    s = seqs[1]
    hidden = backbone(reward_model)(input_ids=torch.tensor([s])).last_hidden_state[0, -1]
    assert_close(alone[1], value_head(reward_model)(hidden)[0], atol=1e-5, rtol=0)


def test_reward_model_works_when_pad_is_eos(reward_model, tiny_tokenizer):
    # transformers' own pooling looks for the pad id; ours reads the attention mask.
    tok = tiny_tokenizer
    seqs = [[*tok("1=1").input_ids, tok.eos_token_id], [*tok("22=22").input_ids, tok.eos_token_id]]
    ids = pad(seqs, tok.eos_token_id)
    mask = pad([[1] * len(s) for s in seqs], 0).bool()
    alone = sequence_scores(reward_model, torch.tensor([seqs[0]]), torch.ones(1, 4).bool())
    assert_close(sequence_scores(reward_model, ids, mask)[0], alone[0], atol=1e-5, rtol=0)


def test_critic_from_policy_starts_at_zero_and_from_rm_equals_rm(tiny_model_dir, tmp_path,
                                                                 reward_model):
    critic = load_critic(tiny_model_dir, init="policy")
    ids = torch.tensor([[5, 10, 11, 12]])
    mask = torch.ones_like(ids).bool()
    assert torch.count_nonzero(token_values(critic, ids, mask)) == 0
    save_model(reward_model, tmp_path / "rm")
    critic = load_critic(tmp_path / "rm", init="reward_model")
    assert_close(token_values(critic, ids, mask), token_values(reward_model, ids, mask),
                 atol=1e-6, rtol=0)
    # V(s_t) of response token t is read one position earlier
    assert_close(response_values(critic, ids, mask, 2), token_values(critic, ids, mask)[:, 1:3])
    with pytest.raises(ConfigError, match="critic init"):
        load_critic(tiny_model_dir, init="random")


def test_lora_reference_equals_the_base_model(tiny_model_dir, tiny_tokenizer):
    torch.manual_seed(0)
    policy = load_causal_lm(tiny_model_dir, lora=LoraSpec(r=4, target_modules=["q_proj",
                                                                               "v_proj"]))
    with torch.no_grad():  # make the adapters do something (B starts at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    base = load_reference(tiny_model_dir)
    ref = AdapterDisabledReference(policy)
    ids = torch.tensor([tiny_tokenizer("12+34=46").input_ids])
    mask = torch.ones_like(ids).bool()
    ref_lp, _ = response_logprobs(ref, ids, mask, 4)
    base_lp, _ = response_logprobs(base, ids, mask, 4)
    pol_lp, _ = response_logprobs(policy, ids, mask, 4)
    assert_close(ref_lp, base_lp, atol=1e-6, rtol=0)
    assert (pol_lp - base_lp).abs().max() > 1e-3  # the adapters are on outside the context
    assert not any(p.requires_grad for p in base.parameters())
    # no second copy: the reference holds no parameters of its own
    assert list(ref.parameters()) == []


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tiny_tokenizer, lora):
    """Plain and LoRA (peft) models: checkpointed layers give the gradients of plain ones
    for the trainable parameters, and the two copies really differ in the switch."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        spec = LoraSpec(r=4, target_modules=["q_proj", "v_proj"]) if lora else None
        model = load_causal_lm(tiny_model_dir, lora=spec)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        if ckpt:
            enable_gradient_checkpointing(model)
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == ckpt for m in layers)
        model.train()
        ids = torch.tensor([tiny_tokenizer("12+34=46").input_ids] * 2)
        logp, _ = response_logprobs(model, ids, torch.ones_like(ids).bool(), 4)
        logp.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_refuses_a_model_without_it():
    with pytest.raises(ConfigError, match=r"run\.gradient_checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_lora_model_saves_merged_in_hf_format(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    policy = load_causal_lm(tiny_model_dir, lora=LoraSpec(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    save_model(policy, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[5, 10, 11, 12, 13]])
    assert_close(reloaded(ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot load the policy model from .*no such directory"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="dtype 'fp8'"):
        load_causal_lm(str(tmp_path), dtype="fp8")


def model_copy(tiny_model_dir, out, keep=None):
    """A copy of the tiny model's directory: every file, or only those named in `keep`."""
    out.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.is_file() and (keep is None or f.name in keep):
            shutil.copy(f, out / f.name)
    return out


def test_a_directory_without_a_tokenizer_says_so(tiny_model_dir, tmp_path):
    bare = model_copy(tiny_model_dir, tmp_path / "bare",
                      keep={"config.json", "generation_config.json", "model.safetensors"})
    with pytest.raises(ConfigError) as err:
        load_tokenizer(bare)
    assert str(err.value) == (
        f"cannot load the tokenizer from {str(bare)!r}: the directory has no tokenizer files "
        "(tokenizer.json, tokenizer_config.json, ...); save the model's tokenizer there with "
        f"tokenizer.save_pretrained({str(bare)!r}), or give a directory or hub id that has one "
        "(model.tokenizer in a training config)")
    load_causal_lm(bare)  # the weights alone load


CAUSAL, SEQ_CLS = "AutoModelForCausalLM", "AutoModelForSequenceClassification"


@pytest.mark.parametrize(("loader", "what", "auto_class"), [
    (load_causal_lm, "policy model", CAUSAL),
    (load_reference, "policy model", CAUSAL),
    (load_reward_model, "reward model", SEQ_CLS),
    (load_critic, "reward model", SEQ_CLS),
], ids=["policy", "reference", "reward_model", "critic"])
def test_damaged_or_pickle_weights_are_refused_in_one_line(loader, what, auto_class,
                                                             tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    damaged = model_copy(tiny_model_dir, tmp_path / "damaged")
    (damaged / "model.safetensors").write_bytes(b"\xff" * 64)  # a header "2**64-1 bytes long"
    with pytest.raises(ConfigError) as err:
        loader(damaged)
    message = str(err.value)
    assert message.startswith(f"cannot load the {what} from {str(damaged)!r}: model.safetensors "
                              "cannot be read (SafetensorError: ")
    assert message.endswith("so the file is damaged or incomplete; download or save the model "
                            "there again")
    assert "\n" not in message

    pickled = model_copy(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(ConfigError) as err:
        loader(pickled)
    assert str(err.value) == (
        f"cannot load the {what} from {str(pickled)!r}: it has pickle weights only "
        "(pytorch_model.bin), which posttrain refuses to load (unpickling a file can run "
        "code); if you trust the file, convert it once in Python "
        f"with `{auto_class}.from_pretrained({str(pickled)!r}).save_pretrained({str(pickled)!r})` "
        "(transformers reads the pickle with torch.load(weights_only=True) and writes "
        "model.safetensors)")


def test_the_conversion_the_pickle_error_gives_works(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    pickled = model_copy(tiny_model_dir, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(str(pickled)).save_pretrained(str(pickled))
    ids = torch.tensor([[5, 10, 11, 12]])
    assert_close(load_causal_lm(pickled)(ids).logits, load_causal_lm(tiny_model_dir)(ids).logits,
                 atol=0, rtol=0)


def test_max_positions_reads_the_config_then_a_real_tokenizer_limit(tiny_model_dir, arch_model,
                                                                   reward_model, tiny_tokenizer):
    from types import SimpleNamespace

    # config.json's max_position_embeddings (Llama), n_positions (GPT-2), under LoRA too
    assert max_positions(load_causal_lm(tiny_model_dir)) == 256
    lora = load_causal_lm(tiny_model_dir, lora=LoraSpec(r=2, target_modules=["q_proj"]))
    assert max_positions(lora) == 256
    assert max_positions(load_causal_lm(arch_model("gpt2"))) == 256
    assert max_positions(reward_model) == 256
    assert max_positions(SimpleNamespace(n_positions=1024)) == 1024
    # no length in the config: the tokenizer's, unless it is transformers' "no limit" 1e30
    assert tiny_tokenizer.model_max_length > 10**20
    assert max_positions(SimpleNamespace(), tiny_tokenizer) is None
    assert max_positions(SimpleNamespace(), SimpleNamespace(model_max_length=512)) == 512
    assert max_positions(SimpleNamespace()) is None


def test_reward_model_reward_fits_a_200000_character_prompt_in_the_models_positions(
        reward_model, tiny_tokenizer):
    from posttrain.rewards.model import RewardModelReward

    long = "12+34=46; " * 20_000
    rm = RewardModelReward(reward_model, tiny_tokenizer)
    short, cut = rm.encode(["1+1=", long], ["2", "46"])
    assert short == [*tiny_tokenizer("1+1=2").input_ids, tiny_tokenizer.eos_token_id]
    # the prompt keeps its end, the response stays whole: 256 tokens, the model's positions
    assert len(cut) == 256
    assert cut[-3:] == [*tiny_tokenizer("46").input_ids, tiny_tokenizer.eos_token_id]
    assert cut[:-3] == list(tiny_tokenizer(long).input_ids)[-253:]
    assert len(rm([long], ["46"])) == 1
