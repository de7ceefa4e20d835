"""Boundary checks shared by the public functions of `posttrain.algos`, and the one way to
drop padding (`select`).

Only shapes, dtypes and devices are checked: they cost nothing. Values are not checked, since
that would force a device-to-host sync on every call.
"""

from __future__ import annotations

import torch

from posttrain.errors import ShapeError


def check_tensor(name: str, x: object, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ShapeError(f"`{name}` must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_float(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ShapeError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")


def check_like(name: str, x: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """`x` must be a tensor of exactly `ref`'s shape and on its device."""
    x = check_tensor(name, x)
    if x.shape != ref.shape:
        raise ShapeError(
            f"`{name}` has shape {tuple(x.shape)} but `{ref_name}` has shape {tuple(ref.shape)}; "
            "they must match"
        )
    if x.device != ref.device:
        raise ShapeError(f"`{name}` is on {x.device} but `{ref_name}` is on {ref.device}")
    return x


def check_mask(name: str, mask: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """A mask where True (or 1) means "this position counts". Returned in `ref`'s dtype."""
    mask = check_like(name, mask, ref_name, ref)
    if mask.is_complex():
        raise ShapeError(f"`{name}` must be a bool or 0/1 tensor, got dtype {mask.dtype}")
    return mask.to(ref.dtype) if ref.is_floating_point() else mask.to(torch.float32)


def check_rows(name: str, x: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """`x` must be a vector with one entry per row of `ref`."""
    x = check_tensor(name, x, ndim=1)
    if x.shape[0] != ref.shape[0]:
        raise ShapeError(
            f"`{name}` has {x.shape[0]} entries but `{ref_name}` has {ref.shape[0]} rows; "
            "give one entry per sequence"
        )
    return x


def check_keep(name: str, mask: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """`check_mask`, returned as a bool tensor: True where the entry is non-zero (counts)."""
    return check_mask(name, mask, ref_name, ref) != 0


def select(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`x` where `keep` is True, 0 elsewhere (STYLE habit 14).

    A selection, never a product with the mask: NaN · 0 and inf · 0 are NaN, in the value and,
    by the chain rule, in the gradient. `torch.where` sends exactly 0 gradient to the entries
    it drops. To keep a non-finite padding value out of the gradient as well, select the
    *inputs* of any non-linear step (exp, a product of two inputs, ...) before it, not only its
    output: the backward of `exp(inf)` is `0 · inf` even when the output is dropped afterwards.
    Integer or bool inputs come back as float32, as a product with a float mask did.
    """
    dtype = x.dtype if x.is_floating_point() or x.is_complex() else torch.float32
    return torch.where(keep, x, torch.zeros((), dtype=dtype, device=x.device))
