"""INT8 quantization: per tensor, per token, per channel and per group, symmetric or
asymmetric, on the CPU and CUDA (``torch.ops.memwarden.*``).

Conventions (the same as vLLM's ``scaled_int8_quant``):

* symmetric: ``scale = absmax / 127``, ``q = round(x / scale)``
* asymmetric: ``scale = (max - min) / 255``, ``azp = round(-128 - min / scale)``,
  ``q = round(x / scale) + azp``; dequantized value ``(q - azp) * scale``
* ``round`` is round half to even, and ``q`` saturates to [-128, 127].

Edge cases are defined, never NaN: a group whose finite values are all zero gets
``scale = 0`` and ``q = 0``; an asymmetric group holding one constant value has its
range widened to include zero, so the constant round-trips exactly. Non-finite
inputs do not take part in the scale: NaN quantizes to the zero point (it dequantizes
to 0), +Inf to 127 and -Inf to -128 (a group with no non-zero finite value has scale 0
and quantizes everything, Inf included, to the zero point).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from memwarden import _native

_native.load()  # registers torch.ops.memwarden.*

__all__ = ["GRANULARITIES", "broadcast_scale", "dequantize_int8", "quantize_int8", "quantize_int8_into", "scaled_int8_quant"]

GRANULARITIES = ("tensor", "token", "channel", "group")


def scaled_int8_quant(
    input: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
    azp: Optional[torch.Tensor] = None,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize ``input`` to INT8 with vLLM's call shape.

    With ``scale`` (float32, one element) the quantization is static per tensor, and
    ``azp`` (int32, one element) makes it asymmetric. Without it, one scale (and zero
    point) per token, i.e. per row of the last dimension, is computed.

    Returns ``(q, scales, azp)``: ``q`` int8 shaped like ``input``; ``scales`` float32,
    ``[num_tokens, 1]`` when dynamic or the given scale; ``azp`` int32 or ``None``.
    """
    return torch.ops.memwarden.scaled_int8_quant(input, scale, azp, symmetric)


def quantize_int8(
    x: torch.Tensor,
    granularity: str = "token",
    group_size: Optional[int] = None,
    symmetric: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Dynamically quantize ``x`` (float32/float16/bfloat16, contiguous) to INT8.

    ``granularity`` decides which elements share a scale, ``x`` seen as
    ``[rows, cols]`` with ``cols`` its last dimension:

    * ``"tensor"``: one scale, shape ``[1]``
    * ``"token"``: one per row, shape ``[*x.shape[:-1], 1]``
    * ``"channel"``: one per column, shape ``[cols]``
    * ``"group"``: one per ``group_size`` consecutive elements of a row, shape
      ``[*x.shape[:-1], cols // group_size]``

    Returns ``(q, scale, azp)`` with ``azp`` (int32, shaped like ``scale``) only when
    ``symmetric`` is False.
    """
    return torch.ops.memwarden.quantize_int8(x, granularity, group_size, symmetric)


def quantize_int8_into(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    azp: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
) -> None:
    """Per-token (``group_size=None``) or per-group dynamic quantization of ``x`` into
    preallocated tensors, e.g. reused buffers of a decode loop: ``q`` int8 shaped like
    ``x``, ``scale`` float32 (and ``azp`` int32, which makes it asymmetric) shaped
    ``[*x.shape[:-1], x.shape[-1] // group_size]``."""
    torch.ops.memwarden.quantize_int8_groups_out(x, group_size or x.shape[-1], q, scale, azp)


def dequantize_int8(
    q: torch.Tensor,
    scale: torch.Tensor,
    azp: Optional[torch.Tensor] = None,
    granularity: str = "token",
    group_size: Optional[int] = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: ``(q - azp) * scale`` as ``out_dtype``."""
    return torch.ops.memwarden.dequantize_int8(q, scale, azp, granularity, group_size, out_dtype)


def broadcast_scale(scale: torch.Tensor, shape: torch.Size, granularity: str,
                    group_size: Optional[int] = None) -> torch.Tensor:
    """The scale (or zero point) of every element of a tensor of ``shape``: a view or
    copy shaped like the input, e.g. to bound a round-trip error per element."""
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    if granularity == "tensor":
        per_element = scale.reshape(1, 1).expand(rows, cols)
    elif granularity == "token":
        per_element = scale.reshape(rows, 1).expand(rows, cols)
    elif granularity == "channel":
        per_element = scale.reshape(1, cols).expand(rows, cols)
    elif granularity == "group":
        if not group_size:
            raise ValueError("broadcast_scale: group_size is required for granularity 'group'")
        per_element = scale.reshape(rows, cols // group_size).repeat_interleave(group_size, dim=1)
    else:
        raise ValueError(f"broadcast_scale: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return per_element.reshape(shape)
