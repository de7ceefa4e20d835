"""The generate engine and the Experience dataclass."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.errors import ConfigError, ShapeError
from posttrain.models.forward import response_logprobs
from posttrain.models.load import load_causal_lm
from posttrain.rollout.engine import (
    ENGINES,
    HFGenerateEngine,
    LeanGenerateEngine,
    SamplingConfig,
    _cache_argument,
    filter_logits,
    response_mask_from_eos,
)
from posttrain.rollout.experience import Experience


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request, tiny_model_dir, tiny_tokenizer):
    """Every behaviour test runs on both engines: the lean decode loop and `generate`."""
    model = load_causal_lm(tiny_model_dir)
    tok = tiny_tokenizer
    return ENGINES[request.param](model, tok.pad_token_id, tok.eos_token_id, decode=tok.decode)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [tiny_tokenizer(p).input_ids for p in ("1+2=", "33+41=", "5=")]


def test_same_seed_same_responses_other_seed_other_responses(engine, prompts):
    cfg = SamplingConfig(samples_per_prompt=3, max_new_tokens=10, seed=7)
    a, b = engine.generate(prompts, cfg), engine.generate(prompts, cfg)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts
    c = engine.generate(prompts, SamplingConfig(samples_per_prompt=3, max_new_tokens=10, seed=8))
    assert not torch.equal(a.input_ids, c.input_ids)


def test_generate_does_not_touch_the_global_rng(engine, prompts):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(prompts, SamplingConfig(max_new_tokens=4, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_layout_groups_and_masks(engine, prompts, tiny_tokenizer):
    exp = engine.generate(prompts, SamplingConfig(samples_per_prompt=2, max_new_tokens=12,
                                                  seed=0, temperature=1.5))
    assert len(exp) == 6
    assert exp.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    p_width = exp.input_ids.shape[1] - exp.response_len
    assert p_width == 6  # the longest prompt, "33+41="
    # prompts are left-padded: "5=" has 4 pads before it
    assert exp.attention_mask[4, :p_width].tolist() == [False] * 4 + [True] * 2
    eos = tiny_tokenizer.eos_token_id
    for row, mask, trunc in zip(exp.response_ids, exp.response_mask, exp.truncated, strict=True):
        n = int(mask.sum())
        ended = bool((row[:n] == eos).any())
        assert ended != bool(trunc)
        if ended:  # the mask ends at the first EOS, inclusive
            assert row[n - 1] == eos and not (row[: n - 1] == eos).any()
        assert (row[n:] == tiny_tokenizer.pad_token_id).all()
    assert exp.attention_mask[:, p_width:].equal(exp.response_mask)


def test_rollout_logprobs_equal_a_fresh_forward_pass(engine, prompts):
    for temperature in (1.0, 0.7):
        exp = engine.generate(prompts, SamplingConfig(samples_per_prompt=2, max_new_tokens=12,
                                                      seed=3, temperature=temperature,
                                                      top_k=20, return_logprobs=True))
        fresh, _ = response_logprobs(engine.model, exp.input_ids, exp.attention_mask,
                                     exp.response_len, temperature=temperature)
        assert_close(exp.old_logp, fresh * exp.response_mask, atol=1e-5, rtol=0)


def test_greedy_samples_are_identical(engine, prompts):
    exp = engine.generate(prompts, SamplingConfig(samples_per_prompt=2, max_new_tokens=6,
                                                  temperature=0))
    assert torch.equal(exp.input_ids[0], exp.input_ids[1])


def test_meta_and_prompts_follow_the_samples(engine, prompts):
    exp = engine.generate(prompts, SamplingConfig(samples_per_prompt=2, max_new_tokens=3),
                          prompts=["a", "b", "c"], meta={"answer": ["3", "74", "5"]})
    assert exp.prompts == ("a", "a", "b", "b", "c", "c")
    assert exp.meta == {"answer": ["3", "3", "74", "74", "5", "5"]}


def test_chunks_concat_to_the_same_shapes(tiny_model_dir, tiny_tokenizer, prompts):
    model = load_causal_lm(tiny_model_dir)
    small = HFGenerateEngine(model, tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id,
                             max_batch_prompts=1)
    exp = small.generate(prompts, SamplingConfig(samples_per_prompt=2, max_new_tokens=5, seed=0))
    assert len(exp) == 6 and exp.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert exp.input_ids.shape[1] - exp.response_len == 6


def test_response_mask_from_eos():
    ids = torch.tensor([[4, 2, 5, 2], [4, 4, 4, 4], [2, 9, 9, 9]])
    mask, truncated = response_mask_from_eos(ids, eos_id=2)
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert truncated.tolist() == [False, True, False]


def test_update_weights_copies_into_a_separate_model(tiny_model_dir, tiny_tokenizer):
    engine_model = load_causal_lm(tiny_model_dir)
    trained = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        trained.model.embed_tokens.weight.add_(1.0)
    eng = HFGenerateEngine(engine_model, tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id)
    eng.update_weights(trained.named_parameters())
    assert torch.equal(engine_model.model.embed_tokens.weight, trained.model.embed_tokens.weight)
    with pytest.raises(ConfigError, match="no 'nope'"):
        eng.update_weights([("nope", torch.zeros(1))])


def test_sampling_config_validation():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        SamplingConfig(samples_per_prompt=0)


def make_exp(b, p, t, fill):
    ids = torch.full((b, p + t), fill)
    return Experience(input_ids=ids, attention_mask=torch.ones(b, p + t, dtype=torch.bool),
                      response_mask=torch.ones(b, t, dtype=torch.bool),
                      group_ids=torch.arange(b), truncated=torch.zeros(b, dtype=torch.bool),
                      texts=tuple(str(i) for i in range(b)), meta={"k": list(range(b))},
                      scores=torch.arange(b, dtype=torch.float32))


def test_experience_select_split_concat():
    exp = make_exp(5, 2, 3, fill=7)
    sub = exp.select([4, 0])
    assert sub.texts == ("4", "0") and sub.meta == {"k": [4, 0]}
    assert sub.scores.tolist() == [4.0, 0.0]
    assert [len(s) for s in exp.split(2)] == [2, 2, 1]
    other = make_exp(2, 4, 1, fill=9)
    both = Experience.concat([exp, other], pad_id=0)
    assert both.input_ids.shape == (7, 4 + 3)
    # the first part's prompts are left-padded by 2, the second part's responses right-padded
    assert both.input_ids[0].tolist() == [0, 0, 7, 7, 7, 7, 7]
    assert both.input_ids[5].tolist() == [9, 9, 9, 9, 9, 0, 0]
    assert both.response_mask[5].tolist() == [True, False, False]
    assert both.attention_mask[0].tolist() == [False, False] + [True] * 5
    with pytest.raises(ShapeError, match="scores has 2 rows"):
        exp.replace(scores=torch.zeros(2))


# -- the lean engine against the plain path (transformers' generate, prompt repeated n times)

@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_tokenizer):
    """Both engines on one model, with EOS = several common characters, so that rows finish
    at different steps and the lean loop drops them from its batch mid-way."""
    model = load_causal_lm(tiny_model_dir)
    tok = tiny_tokenizer
    eos = [tok.eos_token_id, *tok.convert_tokens_to_ids(list("0123456789"))]
    return (LeanGenerateEngine(model, tok.pad_token_id, eos),
            HFGenerateEngine(model, tok.pad_token_id, eos))


@pytest.mark.parametrize("n", [1, 3])
def test_lean_greedy_equals_generate(pair, prompts, tiny_tokenizer, n):
    lean, hf = pair
    # EOS also = the token greedy decoding of "abc" starts with: that row ends at once while
    # the others run to the limit, so the lean loop drops a row from its batch and cache
    extra = tiny_tokenizer("abc").input_ids
    first = lean.model(input_ids=torch.tensor([extra])).logits[0, -1].argmax().item()
    eos = [*lean.eos_id, first]
    lean_, hf_ = (LeanGenerateEngine(lean.model, lean.pad_id, eos),
                  HFGenerateEngine(hf.model, hf.pad_id, eos))
    cfg = SamplingConfig(samples_per_prompt=n, max_new_tokens=12, temperature=0)
    a, b = lean_.generate([*prompts, extra], cfg), hf_.generate([*prompts, extra], cfg)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.truncated, b.truncated)
    lengths = a.response_mask.sum(-1)
    assert int(lengths.min()) == 1 and int(lengths.max()) == 12  # rows ended at different steps


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.7), (8, 0.9)])
def test_lean_samples_the_same_tokens_as_generate(pair, prompts, top_k, top_p):
    """Same seed, same filters: the same draws from the same distributions, token for token."""
    lean, hf = pair
    cfg = SamplingConfig(samples_per_prompt=4, max_new_tokens=10, temperature=0.8,
                         top_k=top_k, top_p=top_p, seed=3, return_logprobs=True)
    a, b = lean.generate(prompts, cfg), hf.generate(prompts, cfg)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert_close(a.old_logp, b.old_logp, atol=1e-5, rtol=0)


def test_lean_logprobs_equal_a_fresh_forward(pair, prompts):
    lean, _ = pair
    exp = lean.generate(prompts, SamplingConfig(samples_per_prompt=3, max_new_tokens=10,
                                                temperature=1.3, seed=0, return_logprobs=True))
    fresh, _ = response_logprobs(lean.model, exp.input_ids, exp.attention_mask,
                                 exp.response_len, temperature=1.3)
    assert_close(exp.old_logp, fresh * exp.response_mask, atol=1e-5, rtol=0)


def test_filter_logits_hand_computed():
    scores = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert filter_logits(scores, top_k=2).isinf().tolist() == [[True, False, False, True]]
    # softmax = [0.0871, 0.6439, 0.2369, 0.0321]: the top-0.7 nucleus is {3.0, 2.0}
    assert filter_logits(scores, top_p=0.7).isinf().tolist() == [[True, False, False, True]]
    # top-p of 0.5 still keeps the most likely token
    assert filter_logits(scores, top_p=0.5).isinf().tolist() == [[True, False, True, True]]


def test_compiled_static_cache_decode_equals_generate(pair, prompts):
    """rollout.compile: static KV cache + torch.compile'd decode step; the same greedy tokens
    and the same samples as `generate` (every row draws every step, as there)."""
    lean, hf = pair
    compiled = LeanGenerateEngine(lean.model, lean.pad_id, lean.eos_id, compile=True)
    for cfg in (SamplingConfig(samples_per_prompt=2, max_new_tokens=10, temperature=0),
                SamplingConfig(samples_per_prompt=2, max_new_tokens=10, temperature=0.8,
                               seed=5, return_logprobs=True)):
        a, b = compiled.generate(prompts, cfg), hf.generate(prompts, cfg)
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.response_mask, b.response_mask)
        if cfg.return_logprobs:
            assert_close(a.old_logp, b.old_logp, atol=1e-4, rtol=0)


def test_the_cache_goes_by_the_name_the_model_takes(tiny_model_dir):
    """`transformers` renamed `past_key_values` to `cache` (the old name is deprecated); the
    lean engine passes the one the model's forward declares, LoRA-wrapped models included."""
    import inspect

    from posttrain.models.load import LoraSpec

    model = load_causal_lm(tiny_model_dir)
    params = inspect.signature(model.forward).parameters
    assert _cache_argument(model) == ("cache" if "cache" in params else "past_key_values")
    lora = load_causal_lm(tiny_model_dir, lora=LoraSpec(r=2, target_modules=["q_proj"]))
    assert _cache_argument(lora) == _cache_argument(model)

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    assert _cache_argument(Old()) == "past_key_values"


def test_every_engine_implements_the_protocol_the_trainer_uses(engine, prompts):
    """Through `RolloutEngine` alone: `.model`, `generate(..., seeds=)` with recorded
    log-probs, `update_weights`. Per-prompt seeds make a prompt's group the same whatever
    batch it is sampled in."""
    from posttrain.rollout.engine import RolloutEngine

    assert isinstance(engine, RolloutEngine)
    proto: RolloutEngine = engine
    assert isinstance(proto.model, torch.nn.Module)
    cfg = SamplingConfig(samples_per_prompt=2, max_new_tokens=6, seed=3, return_logprobs=True)
    both = proto.generate(prompts[:2], cfg, prompts=["a", "b"], meta={"k": [1, 2]},
                          seeds=[11, 12])
    alone = proto.generate(prompts[1:2], cfg, seeds=[12])
    assert both.group_ids.tolist() == [0, 0, 1, 1] and both.meta["k"] == [1, 1, 2, 2]
    assert both.old_logp is not None and both.old_logp.shape == both.response_mask.shape
    assert both.texts[2:] == alone.texts
    proto.update_weights(proto.model.named_parameters())  # a copy onto itself is a no-op
    again = proto.generate(prompts[1:2], cfg, seeds=[12])
    assert again.texts == alone.texts
