"""The vLLM engine against the trainer's own forward pass and the lean engine, on one
engine per module (vLLM takes ~15 s to start here). Tolerances are measured on this CPU:
vLLM's kernels (its attention, fused QKV and gate-up projections) round differently from
`transformers`' by ~1e-6 in float32."""

from __future__ import annotations

import copy
import re
import sys

import pytest
import torch
from torch.testing import assert_close

from posttrain.algos import token_logprobs
from posttrain.errors import ConfigError
from posttrain.models.load import LoraSpec, apply_lora, load_causal_lm
from posttrain.rollout.engine import LeanGenerateEngine, SamplingConfig, filter_logits
from posttrain.rollout.vllm_engine import hf_named_weights, samples_to_experience

ATOL = 2e-4  # |log μ − log π| in float32 (measured max ~1e-5 on this model)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(vllm_installed, model, tiny_tokenizer):
    from posttrain.rollout.vllm_engine import VLLMEngine

    tok = tiny_tokenizer
    eng = VLLMEngine(model.config, tok.pad_token_id, tok.eos_token_id, decode=tok.decode,
                     max_model_len=64)
    eng.update_weights(hf_named_weights(model))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer(p).input_ids for p in ("1+2=", "33+41=", "5=", "hello there")]


def trainer_logp(model, exp, temperature=1.0, top_k=0, top_p=1.0):
    """log-probs of the sampled tokens from a fresh forward pass, under the same processing
    (temperature, top-k, top-p) the engine sampled with."""
    with torch.no_grad():
        t = exp.response_len
        logits = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask).logits
        logits = logits[:, -t - 1 : -1].float() / temperature
        b, _, v = logits.shape
        logits = filter_logits(logits.reshape(b * t, v), top_k, top_p).reshape(b, t, v)
        logp = token_logprobs(logits, exp.response_ids)
        return torch.where(exp.response_mask, logp, 0.0)  # padding may be outside the kept set


def test_greedy_samples_are_the_lean_engines_and_so_are_their_logprobs(engine, model,
                                                                       tiny_tokenizer, prompts):
    tok = tiny_tokenizer
    lean = LeanGenerateEngine(model, tok.pad_token_id, tok.eos_token_id, decode=tok.decode)
    greedy = SamplingConfig(samples_per_prompt=2, max_new_tokens=12, temperature=0,
                            return_logprobs=True)
    ours, theirs = engine.generate(prompts, greedy), lean.generate(prompts, greedy)
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.response_mask, theirs.response_mask)
    assert torch.equal(ours.truncated, theirs.truncated) and ours.texts == theirs.texts
    assert_close(ours.old_logp, theirs.old_logp, atol=ATOL, rtol=0)
    assert ours.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0),
                                                     (1.0, 5, 1.0), (0.8, 0, 0.6)])
def test_sampled_logprobs_are_those_of_the_processed_distribution(engine, model, prompts,
                                                                  temperature, top_k, top_p):
    """μ is the distribution the token was drawn from: softmax(z / T) after top-k / top-p,
    renormalised. With a filter on, a token outside the kept set is never drawn."""
    cfg = SamplingConfig(samples_per_prompt=4, max_new_tokens=10, temperature=temperature,
                         top_k=top_k, top_p=top_p, seed=3, return_logprobs=True)
    exp = engine.generate(prompts, cfg)
    expected = trainer_logp(model, exp, temperature, top_k, top_p)
    assert torch.isfinite(expected).all()  # every drawn token is inside the kept set
    assert_close(exp.old_logp, expected, atol=ATOL, rtol=0)
    if top_k or top_p < 1:  # and it is not the unfiltered distribution
        unfiltered = trainer_logp(model, exp, temperature)
        assert (exp.old_logp - unfiltered).abs().max() > 1e-2


def test_a_prompts_samples_follow_its_seed_not_its_batch(engine, prompts):
    cfg = SamplingConfig(samples_per_prompt=3, max_new_tokens=10, return_logprobs=True)
    both = engine.generate(prompts[:2], cfg, seeds=[11, 12])
    alone = engine.generate(prompts[1:2], cfg, seeds=[12])
    assert both.texts[3:] == alone.texts
    again = engine.generate(prompts[:2], cfg, seeds=[11, 12])
    other = engine.generate(prompts[:2], cfg, seeds=[13, 14])
    assert again.texts == both.texts and other.texts != both.texts
    assert len(set(both.texts[:3])) > 1  # the n samples of one prompt differ


def test_after_a_weight_update_the_engine_scores_tokens_as_the_trainer(engine, model,
                                                                       tiny_tokenizer, prompts):
    moved = copy.deepcopy(model)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seqs = [tiny_tokenizer(s).input_ids for s in ("12+3=15", "hello there friend")]

    def ours(m):
        return [token_logprobs(m(input_ids=torch.tensor([s])).logits[:, :-1],
                               torch.tensor([s[1:]]))[0] for s in seqs]

    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    before = engine.generate(prompts, greedy).texts
    with torch.no_grad():
        old, new = ours(model), ours(moved)
    for got, want in zip(engine.score(seqs), old, strict=True):
        assert_close(torch.tensor(got), want, atol=ATOL, rtol=0)
    try:
        engine.update_weights(hf_named_weights(moved))
        for got, want, was in zip(engine.score(seqs), new, old, strict=True):
            assert_close(torch.tensor(got), want, atol=ATOL, rtol=0)
            assert (want - was).abs().max() > 1e-2  # the update did move them
        assert engine.generate(prompts, greedy).texts != before  # and sampling follows
    finally:
        engine.update_weights(hf_named_weights(model))
    assert engine.generate(prompts, greedy).texts == before


def test_a_prompt_longer_than_the_engine_serves_is_refused(engine):
    with pytest.raises(ConfigError, match=re.escape(
            "exceeds the vLLM engine's max_model_len 64: raise rollout.vllm_max_model_len")):
        engine.generate([[5] * 60], SamplingConfig(max_new_tokens=8))


# ----------------------------------------------------------------- without a running engine


def test_samples_become_an_experience_cut_after_eos_and_padded():
    eos, pad_id = 1, 0
    samples = [[([7, 8, 1], [-0.5, -0.25, -0.125]), ([9, 9, 9, 9], [-1.0, -1.0, -1.0, -1.0])],
               [([1], [-2.0]), ([4, 1, 5], [-0.375, -0.0625, -3.0])]]  # a token after EOS: cut
    exp = samples_to_experience([[3, 4], [5]], samples, pad_id, eos, "cpu", True)
    assert exp.input_ids.tolist() == [[3, 4, 7, 8, 1, 0], [3, 4, 9, 9, 9, 9],
                                      [0, 5, 1, 0, 0, 0], [0, 5, 4, 1, 0, 0]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1],
                                           [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0]]
    assert exp.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                                          [1, 1, 0, 0]]
    assert exp.truncated.tolist() == [False, True, False, False]
    assert exp.old_logp.tolist() == [[-0.5, -0.25, -0.125, 0.0], [-1.0] * 4,
                                     [-2.0, 0.0, 0.0, 0.0], [-0.375, -0.0625, 0.0, 0.0]]
    with pytest.raises(ConfigError, match="fewer log-probs than tokens"):
        samples_to_experience([[3]], [[([7, 8], [-1.0])]], pad_id, eos, "cpu", True)


def test_lora_weights_are_pushed_merged_and_the_model_is_left_as_it_was(model):
    lora = apply_lora(copy.deepcopy(model), LoraSpec(r=4, alpha=8), "CAUSAL_LM")
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    pushed = dict(hf_named_weights(lora))
    merged = copy.deepcopy(lora).merge_and_unload()
    want = dict(merged.named_parameters())
    assert set(pushed) == set(want)  # checkpoint names; no adapter tensor
    for name, tensor in want.items():
        assert_close(pushed[name], tensor, atol=1e-6, rtol=0)
    assert any((pushed[n] - model.state_dict()[n]).abs().max() > 1e-3 for n in pushed)
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in before.items())


def test_choosing_vllm_without_it_is_one_line_naming_the_extra(monkeypatch):
    from posttrain.rollout.vllm_engine import import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(ConfigError) as err:
        import_vllm()
    assert "pip install 'posttrain[vllm]'" in str(err.value) and "\n" not in str(err.value)


def test_a_rollout_server_that_is_not_there_is_one_line_saying_how_to_start_it(model):
    from posttrain.rollout.server import RemoteVLLMEngine

    with pytest.raises(ConfigError) as err:
        RemoteVLLMEngine("http://127.0.0.1:9", model.config, 0, 1, timeout=5)
    msg = str(err.value)
    assert msg.startswith("rollout.server http://127.0.0.1:9 is not reachable (")
    assert msg.endswith("start it with `posttrain rollout-server --model DIR`")
    assert "\n" not in msg


def test_a_rollout_server_model_that_is_not_there_is_one_line(tmp_path, capsys):
    from posttrain.cli import main

    missing = tmp_path / "missing"
    assert main(["rollout-server", "--model", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"posttrain rollout-server: cannot load the rollout server's model "
                          f"config from {str(missing)!r} (no such directory; give a local "
                          "model directory or a hub id): ")
    assert "\n" not in err and "Traceback" not in err


def test_rollout_server_and_vllm_options_are_checked():
    from posttrain.trainers.rl import RolloutConfig

    with pytest.raises(ConfigError, match=r"rollout\.server needs rollout\.engine=vllm"):
        RolloutConfig(server="http://127.0.0.1:8000")
    with pytest.raises(ConfigError, match=re.escape(
            "rollout.vllm_gpu_memory_utilization must be in (0, 1], got 1.5")):
        RolloutConfig(engine="vllm", vllm_gpu_memory_utilization=1.5)
