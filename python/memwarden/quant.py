"""INT8 quantization: per tensor, per token, per channel and per group, symmetric or
asymmetric, on the CPU and CUDA (``torch.ops.memwarden.*``).

Conventions (the same as vLLM's ``scaled_int8_quant``):

* symmetric: ``scale = absmax / 127``, ``q = round(x / scale)``
* asymmetric: ``scale = (max - min) / 255``, ``azp = round(-128 - min / scale)``,
  ``q = round(x / scale) + azp``; dequantized value ``(q - azp) * scale``
* ``round`` is round half to even, and ``q`` saturates to [-128, 127].

Three rules keep every finite input representable, with nothing overflowing:

* The asymmetric range always includes 0 (``min <= 0 <= max``), as torch.ao's observers
  do: the zero point lies in [-128, 127], 0 (padding, masked values, NaN) reads back as
  exactly 0, and ``|x / scale| <= 255`` keeps float32 exact to the step. A group far
  from zero (all values in ``[1e6, 1e6 + 1]``) therefore gets the coarse step
  ``max / 255``: subtract such an offset before quantizing.
* The range is computed in double: ``max - min`` beyond float32's maximum still gives a
  finite scale.
* The scale is at least ``torch.finfo(torch.float32).tiny`` (~1.18e-38), so ``1 / scale``
  stays finite: a group whose absmax is below ~1.5e-36 is quantized with that step (an
  absolute error of at most ~5.9e-39).

Edge cases are defined, never NaN: a group whose finite values are all zero gets
``scale = 0`` and ``q = 0``. Non-finite inputs do not take part in the scale: NaN
quantizes to the zero point (it dequantizes to 0), +Inf to 127 and -Inf to -128 (a
group with no non-zero finite value has scale 0 and quantizes everything, Inf
included, to the zero point). An empty input gives an empty ``q`` and scales of the
documented shape: zero-sized for ``"token"``/``"group"`` (no rows), ``[1]`` for
``"tensor"`` and ``[cols]`` for ``"channel"``, all 0 (zero point 0), like an all-zero
group.

A static scale (``scaled_int8_quant(x, scale)``) must be positive and finite: a
``ValueError`` names it otherwise. On CUDA, where reading it would wait for the GPU,
the check is a device-side assertion (``torch._assert_async``): free of
synchronization, it surfaces at the next one as a CUDA error.

The wrappers check their arguments before calling the ops: a non-tensor is a
``TypeError``, a wrong dtype a ``TypeError`` naming the argument and the dtypes as
torch spells them (``torch.int8``), a bad ``group_size`` (not a positive ``int``; ``bool``
is rejected) a ``ValueError``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from memwarden import _native
from memwarden._checks import integer

_C = _native.load()  # registers torch.ops.memwarden.*

__all__ = ["GRANULARITIES", "broadcast_scale", "dequantize_int8", "quantize_int8", "quantize_int8_into", "scaled_int8_quant"]

GRANULARITIES = ("tensor", "token", "channel", "group")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes) -> str:
    names = [str(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check_tensor(op: str, name: str, value, dtypes=None, optional: bool = False) -> None:
    """TypeError naming ``name`` unless ``value`` is a tensor (or None when optional) of
    one of ``dtypes``."""
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        wanted = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{op}: {name} must be {wanted}, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {_dtype_names(dtypes)}, got {value.dtype}")


def _check_group_size(op: str, group_size) -> Optional[int]:
    if group_size is None:
        return None
    value = integer(group_size, "group_size", where=f"{op}: ")
    if value >= 2**63:
        raise ValueError(f"{op}: group_size {value} does not fit in int64")
    return value


def _check_quantized(op: str, q, scale, azp, group_size) -> Optional[int]:
    """``q`` int8, ``scale`` float32, ``azp`` int32 or None; returns the checked group_size."""
    _check_tensor(op, "q", q, (torch.int8,))
    _check_tensor(op, "scale", scale, (torch.float32,))
    _check_tensor(op, "azp", azp, (torch.int32,), optional=True)
    return _check_group_size(op, group_size)


def _check_granularity(op: str, granularity) -> str:
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise ValueError(f"{op}: granularity must be one of {', '.join(map(repr, GRANULARITIES))}, "
                         f"got {granularity!r}")
    return granularity


def _check_flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
    return value


def _check_input(op: str, x) -> None:
    """``x``: a float tensor with at least one dimension."""
    _check_tensor(op, "x", x, _FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a 0-dim tensor")


def _check_contiguous(op: str, x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError(f"{op}: x must be contiguous, got strides {list(x.stride())} for shape "
                         f"{list(x.shape)} (call .contiguous())")


def _eager(x: torch.Tensor) -> bool:
    """A plain tensor outside torch.compile, dispatch and function modes and autograd: the
    op may skip the dispatcher (at decode sizes, calling a custom op through it costs
    several times the kernel)."""
    return (type(x) is torch.Tensor and not x.requires_grad and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled())


def _check_out_dtype(op: str, out_dtype) -> None:
    if not isinstance(out_dtype, torch.dtype):
        raise TypeError(f"{op}: out_dtype must be a torch.dtype or None, got {type(out_dtype).__name__}")
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be {_dtype_names(_FLOAT_DTYPES)}, got {out_dtype}")


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
    _check_tensor("scaled_int8_quant", "input", input, _FLOAT_DTYPES)
    _check_tensor("scaled_int8_quant", "scale", scale, (torch.float32,), optional=True)
    _check_tensor("scaled_int8_quant", "azp", azp, (torch.int32,), optional=True)
    _check_flag("scaled_int8_quant", "symmetric", symmetric)
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

    ``group_size`` is a positive int (``ValueError`` otherwise, ``bool`` included); it is
    required for ``"group"`` and ignored by the other granularities.

    An empty ``x`` is no error: ``q`` is empty and ``scale`` (and ``azp``) has the shape
    above, zero-sized for ``"token"``/``"group"`` and ``[1]``/``[cols]`` of zeros for
    ``"tensor"``/``"channel"`` (the scale of an all-zero group), so it dequantizes to an
    empty tensor.

    Returns ``(q, scale, azp)`` with ``azp`` (int32, shaped like ``scale``) only when
    ``symmetric`` is False.
    """
    _check_input("quantize_int8", x)
    group_size = _check_group_size("quantize_int8", group_size)
    _check_granularity("quantize_int8", granularity)
    _check_flag("quantize_int8", "symmetric", symmetric)
    _check_contiguous("quantize_int8", x)
    if granularity in ("tensor", "channel") and x.numel() == 0:
        # The kernels reduce over all rows; with none there is nothing to reduce.
        n = 1 if granularity == "tensor" else x.shape[-1]
        q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        scale = torch.zeros(n, dtype=torch.float32, device=x.device)
        azp = None if symmetric else torch.zeros(n, dtype=torch.int32, device=x.device)
        return q, scale, azp
    if granularity in ("token", "group") and x.shape[-1] and _eager(x):  # one kernel, no op chain
        cols = x.shape[-1]
        if granularity == "token" or (group_size is not None and 0 < group_size <= cols and cols % group_size == 0):
            return _C.quant.quantize_groups(x, cols if granularity == "token" else group_size, symmetric)
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
    ``[*x.shape[:-1], x.shape[-1] // group_size]``. ``x`` needs at least one dimension;
    ``group_size`` is None or a positive int (``ValueError`` otherwise)."""
    op = "quantize_int8_into"
    _check_input(op, x)
    group_size = _check_quantized(op, q, scale, azp, group_size)
    _check_contiguous(op, x)
    if group_size is None and x.shape[-1] == 0:  # per token the op would see group_size 0, never passed
        raise ValueError(f"{op}: x's last dimension is empty (shape {list(x.shape)}): there are no tokens' "
                         "values to quantize")
    torch.ops.memwarden.quantize_int8_groups_out(x, x.shape[-1] if group_size is None else group_size, q, scale, azp)


def dequantize_int8(
    q: torch.Tensor,
    scale: torch.Tensor,
    azp: Optional[torch.Tensor] = None,
    granularity: str = "token",
    group_size: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int8`: ``(q - azp) * scale`` as ``out_dtype``
    (float32, float16 or bfloat16).

    ``out_dtype=None`` (the default) means float32: ``q`` carries no record of the dtype it
    was quantized from, so pass ``out_dtype=x.dtype`` to get that back. (The raw op
    ``torch.ops.memwarden.dequantize_int8`` keeps its own default, float16.)
    """
    op = "dequantize_int8"
    _check_granularity(op, granularity)
    group_size = _check_quantized(op, q, scale, azp, group_size)
    out_dtype = torch.float32 if out_dtype is None else out_dtype
    _check_out_dtype(op, out_dtype)
    return torch.ops.memwarden.dequantize_int8(q, scale, azp, granularity, group_size, out_dtype)


def broadcast_scale(scale: torch.Tensor, shape: torch.Size, granularity: str,
                    group_size: Optional[int] = None) -> torch.Tensor:
    """The scale (or zero point) of every element of a tensor of ``shape``: a view or
    copy shaped like the input, e.g. to bound a round-trip error per element."""
    op = "broadcast_scale"
    _check_tensor(op, "scale", scale)
    group_size = _check_group_size(op, group_size)
    _check_granularity(op, granularity)
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError(f"{op}: shape must have at least one dimension, got ()")
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    if granularity == "group":
        if group_size is None:
            raise ValueError(f"{op}: group_size is required for granularity 'group'")
        if cols % group_size:
            raise ValueError(f"{op}: group_size {group_size} must divide the last dimension {cols}")
    groups = {"tensor": 1, "token": rows, "channel": cols,
              "group": rows * (cols // group_size) if group_size else 0}[granularity]
    if scale.numel() != groups:
        raise ValueError(f"{op}: scale must hold {groups} value(s) for {granularity!r} over shape "
                         f"{list(shape)}, got {scale.numel()}")
    if granularity == "tensor":
        per_element = scale.reshape(1, 1).expand(rows, cols)
    elif granularity == "token":
        per_element = scale.reshape(rows, 1).expand(rows, cols)
    elif granularity == "channel":
        per_element = scale.reshape(1, cols).expand(rows, cols)
    else:
        per_element = scale.reshape(rows, cols // group_size).repeat_interleave(group_size, dim=1)
    return per_element.reshape(shape)
