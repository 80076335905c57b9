"""Memory estimate of LLM inference from a model config.

total = weights + KV cache + activation peak + fixed buffers, where

* weights: ``memwarden.models.describe(model, dtype).bytes``;
* KV cache: ``tokens x layers x kv_heads x head_dim x 2 x kv_bytes`` for full attention,
  sliding-window layers hold at most ``sliding_window`` tokens, and MLA layers
  (DeepSeek-V3) cache the compressed latent ``kv_lora_rank + qk_rope_head_dim`` per token
  (as vLLM/SGLang do); tokens = ``batch x context``;
* activations: the peak of one forward step over ``batch x min(context, prefill_chunk)``
  tokens: the residual stream and normed input (2 x H), plus the larger of attention
  (q, k, v and output) and MLP intermediates (gate, up and product of the dense MLP, or of
  ``experts_per_token`` experts), plus fp32 logits for the last token of each sequence;
  in the compute dtype. An estimate of a fused-kernel engine, not of eager PyTorch.
* fixed buffers per accelerator: CUDA context (default 500 MiB) and workspace
  (cuBLAS/attention, default 256 MiB).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from memwarden._units import format_bytes, parse_bytes

__all__ = ["Estimate", "estimate", "max_context", "kv_cache_bytes", "activation_bytes", "auto_reserve",
           "CUDA_CONTEXT_BYTES", "WORKSPACE_BYTES"]

CUDA_CONTEXT_BYTES = 500 * 2**20
WORKSPACE_BYTES = 256 * 2**20
DEFAULT_PREFILL_CHUNK = 2048


def _pos(value: Any, name: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def kv_cache_bytes(spec, context: int, batch: int = 1, kv_bytes: float = 2) -> int:
    """KV cache bytes for ``batch`` sequences of ``context`` tokens."""
    _pos(context, "context", allow_zero=True)
    _pos(batch, "batch")
    if context == 0:
        return 0
    return int(round(spec.kv_bytes_per_token(kv_bytes, context) * context * batch))


def activation_bytes(spec, tokens: int, batch: int = 1, act_bytes: int = 2) -> int:
    """Peak activation bytes of one forward step over ``tokens`` tokens in flight."""
    H = spec.hidden_size
    if spec.attention == "mla":
        attn = spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim) * 2 + H
    else:
        attn = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim + spec.num_heads * spec.head_dim
    mlp_w = spec.intermediate_size
    if spec.is_moe:
        mlp_w = max(mlp_w, spec.moe_intermediate_size * spec.experts_per_token + spec.shared_intermediate_size)
    mlp = 3 * mlp_w
    per_token = 2 * H + max(attn, mlp)
    logits = batch * spec.vocab_size * 4
    return int(tokens * per_token * act_bytes + logits)


@dataclass
class DeviceEstimate:
    device: Any
    memory: int
    model: int
    context: int
    compute: int
    overhead: int

    @property
    def used(self) -> int:
        return self.model + self.context + self.compute + self.overhead

    @property
    def free(self) -> int:
        return self.memory - self.used


@dataclass
class Estimate:
    model: str
    dtype: str
    kv_dtype: str
    context: int
    batch: int
    prefill_chunk: int
    weights: int
    kv_cache: int
    activations: int
    overhead: int
    devices: list = field(default_factory=list)  # DeviceEstimate, when max_memory was given
    fits: bool | None = None

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "devices"}
        d["total"] = self.total
        d["devices"] = [dict(asdict(x), used=x.used, free=x.free) for x in self.devices]
        return d

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def rows(self) -> list:
        rows = [["weights", format_bytes(self.weights)], ["KV cache", format_bytes(self.kv_cache)],
                ["activations", format_bytes(self.activations)], ["fixed buffers", format_bytes(self.overhead)],
                ["total", format_bytes(self.total)]]
        return rows

    def device_rows(self) -> list:
        return [[str(x.device), format_bytes(x.memory), format_bytes(x.model), format_bytes(x.context),
                 format_bytes(x.compute + x.overhead), format_bytes(x.free)] for x in self.devices]

    def report(self) -> str:
        lines = [f"estimate for {self.model}: {self.dtype} weights, {self.kv_dtype} KV, "
                 f"context {self.context} x batch {self.batch}"]
        lines += [f"  {k:<14}{v:>14}" for k, v in self.rows()]
        if self.devices:
            head = ["device", "memory", "model", "context", "compute", "free"]
            rows = [head] + self.device_rows()
            w = [max(len(r[i]) for r in rows) for i in range(len(head))]
            lines += ["  " + "  ".join(c.rjust(x) for c, x in zip(r, w)) for r in rows]
            lines.append("  fits" if self.fits else "  DOES NOT FIT")
        return "\n".join(lines)


def _kv_fmt(kv_dtype, dtype) -> tuple:
    from memwarden.models import weight_format
    if kv_dtype is None:
        fmt = weight_format(dtype, "dtype")
        kv = fmt if fmt in ("bfloat16", "float16", "float32") else "bfloat16"
    else:
        kv = weight_format(kv_dtype, "kv_dtype")
        if kv == "int4":
            raise ValueError("kv_dtype must be bfloat16, float16, float32 or int8, got 'int4'")
    return kv, {"bfloat16": 2, "float16": 2, "float32": 4, "int8": 1}[kv]


def estimate(model: Any, dtype: Any = "bfloat16", context: int | None = None, batch: int = 1, *,
             kv_dtype: Any = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_memory: Any = None,
             cuda_context: Any = CUDA_CONTEXT_BYTES, workspace: Any = WORKSPACE_BYTES) -> Estimate:
    """Memory needed to serve ``model`` (see the module doc). With ``max_memory`` the
    weights are placed by ``memwarden.plan.plan`` and the breakdown is per device."""
    from memwarden import models as M

    desc = M.describe(model, dtype)
    spec = desc.spec
    if context is None:
        context = spec.max_position_embeddings or 4096
    _pos(context, "context")
    _pos(batch, "batch")
    _pos(prefill_chunk, "prefill_chunk")
    kv_name, kvb = _kv_fmt(kv_dtype, dtype)
    fixed = parse_bytes(cuda_context, "cuda_context") + parse_bytes(workspace, "workspace")
    kv = kv_cache_bytes(spec, context, batch, kvb)
    act = activation_bytes(spec, batch * min(context, prefill_chunk), batch)
    est = Estimate(model=spec.name, dtype=desc.dtype, kv_dtype=kv_name, context=context, batch=batch,
                   prefill_chunk=prefill_chunk, weights=desc.bytes, kv_cache=kv, activations=act, overhead=fixed)
    if max_memory is not None:
        _per_device(est, desc, max_memory, kvb, fixed)
    return est


def _per_device(est: Estimate, desc, max_memory, kvb: float, fixed: int) -> None:
    from memwarden import plan as P

    memory = P.parse_max_memory(max_memory)
    acc = [d for d in memory if d not in ("cpu", "disk")] or list(memory)
    n = len(acc)
    reserve = {d: (fixed + est.activations + -(-est.kv_cache // n)) if d in acc else 0 for d in memory}
    reserve = {d: min(r, memory[d] - 1) for d, r in reserve.items()}
    p = P.plan(desc, memory, reserve=reserve, raise_on_infeasible=False)
    spec = desc.spec
    # KV follows the attention layers placed on each device.
    per_layer = kv_cache_bytes(spec, est.context, est.batch, kvb) / max(1, spec.num_layers)
    layers_on = {d: 0 for d in memory}
    if p.feasible:
        for layer, d in p.layer_devices.items():
            layers_on[d] += 1
    else:
        for d in acc:
            layers_on[d] = spec.num_layers / n
    est.devices = [
        DeviceEstimate(device=d, memory=memory[d], model=p.load[d] if p.feasible else int(desc.bytes / n) if d in acc else 0,
                       context=int(per_layer * layers_on[d]),
                       compute=est.activations if d in acc else 0, overhead=fixed if d in acc else 0)
        for d in memory]
    est.fits = p.feasible and all(x.free >= 0 for x in est.devices)


def auto_reserve(spec, devices: list, context: int | None, batch: int = 1, dtype: Any = "bfloat16",
                 kv_dtype: Any = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> dict:
    """Per-device reserve for ``plan(reserve="auto")``: fixed buffers + activations + an
    even share of the KV cache for ``batch x context`` tokens, on each accelerator."""
    if context is None:
        context = min(spec.max_position_embeddings or 4096, 4096)
    _, kvb = _kv_fmt(kv_dtype, dtype)
    acc = [d for d in devices if d not in ("cpu", "disk")] or list(devices)
    kv = kv_cache_bytes(spec, context, batch, kvb)
    act = activation_bytes(spec, batch * min(context, prefill_chunk), batch)
    share = CUDA_CONTEXT_BYTES + WORKSPACE_BYTES + act + -(-kv // len(acc))
    return {d: share for d in acc}


def max_context(model: Any, max_memory: Any, batch: int = 1, dtype: Any = "bfloat16", *,
                kv_dtype: Any = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, limit: int | None = None) -> int:
    """The largest context (tokens per sequence) for which ``estimate(..., max_memory=...)``
    fits, by binary search up to ``limit`` (default: the model's max_position_embeddings).
    Returns 0 when not even one token fits."""
    from memwarden import models as M

    spec = M.model_spec(model)
    hi = limit or spec.max_position_embeddings or 131072
    _pos(hi, "limit")

    def fits(c: int) -> bool:
        return bool(estimate(spec, dtype, c, batch, kv_dtype=kv_dtype, prefill_chunk=prefill_chunk,
                             max_memory=max_memory).fits)

    if not fits(1):
        return 0
    if fits(hi):
        return hi
    lo = 1  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
