"""The boundary checks of `posttrain.algos._checks`: what they return (a mask in the caller's
dtype, `select`'s float32 for integer input) and the messages users read (habit 12: say
where and what to do). Found missing by mutation testing (docs/testing.md)."""

from __future__ import annotations

import pytest
import torch

from posttrain.algos._checks import (
    check_keep,
    check_like,
    check_mask,
    check_rows,
    check_tensor,
    select,
)
from posttrain.errors import ShapeError


def message(fn, *args):
    with pytest.raises(ShapeError) as err:
        fn(*args)
    return str(err.value)


def test_a_mask_comes_back_in_the_references_float_dtype_or_float32():
    """A float64 reference gets a float64 0/1 mask (a float32 mask would round a product in
    float64 code); an integer reference has no float dtype to share, so float32."""
    mask = torch.tensor([[True, False, True]])
    m = check_mask("m", mask, "ref", torch.zeros(1, 3, dtype=torch.float64))
    assert m.dtype == torch.float64 and m.tolist() == [[1.0, 0.0, 1.0]]
    m = check_mask("m", mask, "ref", torch.zeros(1, 3, dtype=torch.long))
    assert m.dtype == torch.float32 and m.tolist() == [[1.0, 0.0, 1.0]]


def test_select_keeps_floats_and_turns_integers_into_float32():
    keep = torch.tensor([True, False, True])
    out = select(torch.tensor([1, 2, 3]), keep)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 3.0]
    out = select(torch.tensor([1.5, float("nan"), 2.5], dtype=torch.float64), keep)
    assert out.dtype == torch.float64 and out.tolist() == [1.5, 0.0, 2.5]


def test_messages_name_the_argument_and_say_what_to_do():
    ref = torch.zeros(2, 3)
    assert message(check_tensor, "x", [1.0]) == "`x` must be a torch.Tensor, got list"
    assert message(check_like, "x", torch.zeros(2), "ref", ref) == (
        "`x` has shape (2,) but `ref` has shape (2, 3); they must match")
    # `meta` is a second device on any machine
    assert message(check_like, "x", torch.zeros(2, 3, device="meta"), "ref", ref) == (
        "`x` is on meta but `ref` is on cpu")
    assert message(check_mask, "m", torch.zeros(2, 3, dtype=torch.complex64), "ref", ref) == (
        "`m` must be a bool or 0/1 tensor, got dtype torch.complex64")
    assert message(check_keep, "m", torch.zeros(2, 2), "ref", ref) == (
        "`m` has shape (2, 2) but `ref` has shape (2, 3); they must match")
    assert message(check_rows, "ids", torch.zeros(3), "ref", ref) == (
        "`ids` has 3 entries but `ref` has 2 rows; give one entry per sequence")


def test_select_keeps_the_dtype_of_a_zero_dim_half_precision_input():
    """A 0-dim bf16 (or fp16) value stays in its dtype: the 0 it is selected against must be
    made in that dtype, since two 0-dim operands promote as ordinary tensors (bf16 with a
    float32 zero would give float32)."""
    for dtype in (torch.bfloat16, torch.float16):
        out = select(torch.tensor(1.5, dtype=dtype), torch.tensor(False))
        assert out.dtype == dtype and out.item() == 0.0
        out = select(torch.tensor(1.5, dtype=dtype), torch.tensor(True))
        assert out.dtype == dtype and out.item() == 1.5


def test_integer_input_gives_float32_whatever_the_default_dtype():
    """The documented float32 for integer or bool input does not follow
    `torch.set_default_dtype` (a float64 default must not turn a mask into float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = select(torch.tensor([1, 2, 3]), torch.tensor([True, False, True]))
    finally:
        torch.set_default_dtype(previous)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 0.0, 3.0]
