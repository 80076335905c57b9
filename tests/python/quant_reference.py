"""Plain-PyTorch reference of the INT8 quantization conventions (see memwarden.quant)."""
from __future__ import annotations

import torch


def grouped(x: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """x as float32 [num_scales, elements sharing the scale]."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    rows, cols = x2.shape
    if granularity == "tensor":
        return x2.reshape(1, -1)
    if granularity == "token":
        return x2
    if granularity == "channel":
        return x2.t().contiguous()
    return x2.reshape(rows * (cols // group_size), group_size)


def ungrouped(g: torch.Tensor, like: torch.Tensor, granularity: str) -> torch.Tensor:
    if granularity == "channel":
        return g.t().reshape(like.shape)
    return g.reshape(like.shape)


FLT_MIN = torch.finfo(torch.float32).tiny


def _step(step: torch.Tensor) -> torch.Tensor:
    """The float32 scale of a step computed in double: 0 stays 0, else at least FLT_MIN."""
    scale = step.float()
    return torch.where(scale > 0, scale.clamp(min=FLT_MIN), 0.0)


def reference_quantize(x: torch.Tensor, granularity: str, group_size: int | None = None, symmetric: bool = True):
    """Returns (q int8 like x, scale float32 [num_scales], azp int32 [num_scales] or None)."""
    g = grouped(x, granularity, group_size)
    finite = torch.isfinite(g)
    if symmetric:
        absmax = torch.where(finite, g.abs(), 0.0).amax(-1)
        scale = _step(absmax.double() / 127.0)
        azp = torch.zeros_like(scale)
    else:
        # The range always includes 0 (so a group with no finite value is [0, 0]), in double.
        lo = torch.where(finite, g, 0.0).amin(-1).double().clamp(max=0.0)
        hi = torch.where(finite, g, 0.0).amax(-1).double().clamp(min=0.0)
        scale = _step((hi - lo) / 255.0)
        safe = torch.where(scale > 0, scale, 1.0).double()
        azp = torch.where(scale > 0, torch.round(-128.0 - lo / safe).clamp(-128, 127), 0.0).float()
    safe = torch.where(scale > 0, scale, 1.0)[:, None]
    q = torch.where(scale[:, None] > 0, torch.round(g / safe), 0.0)
    q = (torch.nan_to_num(q, nan=0.0) + azp[:, None]).clamp(-128, 127).to(torch.int8)
    return ungrouped(q, x, granularity), scale, (None if symmetric else azp.to(torch.int32))


def reference_dequantize(q: torch.Tensor, scale: torch.Tensor, azp, granularity: str, group_size: int | None):
    g = grouped(q, granularity, group_size)
    zero = torch.zeros_like(scale) if azp is None else azp.reshape(-1).float()
    return ungrouped((g - zero.reshape(-1, 1)) * scale.reshape(-1, 1), q, granularity)
