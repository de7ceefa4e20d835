"""Padding-free forward passes give the padded pass's log-probs, entropies and gradients."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.data.collate import micro_batches_by_tokens, pad
from posttrain.models.forward import response_logprobs, sequence_logprobs
from posttrain.models.load import load_causal_lm


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_sequence_logprobs_packed_equal_padded(model):
    torch.manual_seed(0)
    rows = [torch.randint(8, 40, (n,)).tolist() for n in (9, 3, 14, 6)]
    ids = pad(rows, 0)
    att = pad([[1] * len(r) for r in rows], 0).bool()
    loss_mask = att.clone()
    loss_mask[:, :2] = False  # a "prompt" of 2 tokens
    out = {}
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        logp, mask = sequence_logprobs(model, ids, att, loss_mask, packed=packed)
        (-(logp * mask).sum()).backward()
        out[packed] = (logp * mask, _grads(model))
    assert_close(out[True][0], out[False][0], atol=1e-5, rtol=0)
    for name, g in out[False][1].items():
        assert_close(out[True][1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_response_logprobs_packed_equal_padded_with_left_padded_prompts(model):
    """The rollout layout: prompts left-padded to P, responses right-padded to T."""
    torch.manual_seed(1)
    prompts = [torch.randint(8, 40, (n,)).tolist() for n in (5, 2, 7)]
    responses = [torch.randint(8, 40, (n,)).tolist() for n in (4, 6, 1)]
    p_ids = pad(prompts, 0, side="left")
    p_att = pad([[1] * len(p) for p in prompts], 0, side="left").bool()
    r_ids = pad(responses, 0)
    r_att = pad([[1] * len(r) for r in responses], 0).bool()
    ids, att = torch.cat([p_ids, r_ids], 1), torch.cat([p_att, r_att], 1)
    t = r_ids.shape[1]
    res = {}
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        logp, ent = response_logprobs(model, ids, att, t, temperature=0.7, with_entropy=True,
                                      packed=packed)
        ((logp + 0.1 * ent) * r_att).sum().backward()
        res[packed] = (logp * r_att, ent * r_att, _grads(model))
    for a, b in zip(res[True][:2], res[False][:2], strict=True):
        assert_close(a, b, atol=1e-5, rtol=0)
    for name, g in res[False][2].items():
        assert_close(res[True][2][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_budget_counts_real_tokens():
    lengths = [10, 2, 2, 2, 2]
    # padded: 10 + 2 rows x 10 would exceed 16, so every short row waits for another batch
    assert micro_batches_by_tokens(lengths, 16) == [[0], [1, 2, 3, 4]]
    # padding-free: a micro-batch costs the sum of its lengths
    assert micro_batches_by_tokens(lengths, 16, packed=True) == [[0, 1, 2, 3], [4]]


def test_pack_rows_first_fit_decreasing():
    from posttrain.models.forward import pack_rows

    # width 14: 14 alone; 9 opens a row (5 left); 6 does not fit there, opens one; 3 joins 9
    assert pack_rows([9, 3, 14, 6], 14) == [[2], [0, 1], [3]]
    assert pack_rows([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]
