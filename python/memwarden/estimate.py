"""Memory estimate of LLM inference: will it fit, and how much context?

total = weights + cache + activation peak + fixed buffers, where

* weights: ``memwarden.models.describe(model, dtype).bytes`` (the transformers model on
  the meta device, or a GGUF header);
* cache: KV of every layer for ``batch x context`` tokens (sliding and chunked layers
  capped, MLA as a latent or per head, in the KV dtype) plus the state of
  linear-attention/SSM layers (``memwarden.footprint``);
* activations: the peak of one forward step over ``batch x min(context, prefill_chunk)``
  tokens (``footprint.activation_bytes``);
* fixed buffers per accelerator: CUDA context (default 500 MiB) and workspace (256 MiB).

Placement over devices (``max_memory``), two modes that mirror two runtimes:

* ``offload="accelerate"`` (default; transformers/accelerate ``device_map="auto"``):
  weights are placed by ``memwarden.plan`` on the GPUs first, then ``cpu``/``disk``.
  Layers spilled to the CPU or disk still execute on the main (first) GPU: accelerate
  streams their weights in, so their KV lives there, and the largest spilled layer needs
  room there while it runs.
* ``gpu_layers=N`` (llama.cpp's ``-ngl N``): the first N decoder layers and their KV are on
  the GPUs (split in order, in proportion to their memory), the other layers and their KV
  in host memory (``cpu``), where they also execute; token embeddings stay in host
  memory, the output layer joins the GPUs only when every layer does.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from memwarden import footprint as F
from memwarden._checks import integer
from memwarden._devices import SPILL_DEVICES as _SPILL
from memwarden._table import format_table, html_table
from memwarden._units import format_bytes, parse_bytes

__all__ = ["Estimate", "DeviceEstimate", "estimate", "max_context", "OFFLOAD_MODES"]

OFFLOAD_MODES = ("accelerate", "gpu_layers")


@dataclass
class DeviceEstimate:
    device: Any
    memory: int
    model: int          # weight bytes placed here
    context: int        # KV and state bytes kept here
    compute: int        # activations (and streamed-in offloaded weights)
    overhead: int       # fixed buffers

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
    placement: str = ""
    warnings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    # vLLM-style sizing of the memory the devices have left for KV (with max_memory)
    block_size: int = 16
    kv_budget: int | None = None
    kv_blocks: int | None = None
    kv_tokens: int | None = None            # what vLLM logs as its "KV cache size"
    max_sequences: int | None = None        # concurrent sequences of ``context`` tokens

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

    def title(self) -> str:
        return (f"{self.model}: {self.dtype} weights, {self.kv_dtype} KV, "
                f"context {self.context} x batch {self.batch}")

    def rows(self) -> list:
        return [["weights", format_bytes(self.weights)], ["KV cache", format_bytes(self.kv_cache)],
                ["activations", format_bytes(self.activations)], ["fixed buffers", format_bytes(self.overhead)],
                ["total", format_bytes(self.total)]]

    DEVICE_HEADER = ("device", "memory", "model", "context", "compute", "free")

    def device_rows(self) -> list:
        return [[str(x.device), format_bytes(x.memory), format_bytes(x.model), format_bytes(x.context),
                 format_bytes(x.compute + x.overhead), format_bytes(x.free)] for x in self.devices]

    def footer(self) -> list:
        lines = []
        if self.devices:
            lines.append("fits" if self.fits else "DOES NOT FIT")
        if self.kv_blocks is not None:
            lines.append(f"KV room {format_bytes(self.kv_budget)}: {self.kv_blocks} blocks of {self.block_size} "
                         f"tokens, {self.max_sequences} concurrent sequence(s) of {self.context} tokens "
                         f"(KV cache size {self.kv_tokens} tokens)")
        lines += self.notes + [f"warning: {w}" for w in self.warnings]
        return lines

    def tables(self) -> list:
        """(title, header, rows, footer) of each table: the parts, then the devices."""
        if not self.devices:
            return [(self.title(), ["part", "bytes"], self.rows(), self.footer())]
        return [(self.title(), ["part", "bytes"], self.rows(), []),
                (f"per device ({self.placement})", list(self.DEVICE_HEADER), self.device_rows(), self.footer())]

    def report(self) -> str:
        return "\n".join(format_table(*table) for table in self.tables())

    def __repr__(self) -> str:
        fits = "" if self.fits is None else (", fits" if self.fits else ", DOES NOT FIT")
        return (f"<Estimate {self.title()}: total {format_bytes(self.total)} (weights {format_bytes(self.weights)}, "
                f"KV {format_bytes(self.kv_cache)}, activations {format_bytes(self.activations)}, buffers "
                f"{format_bytes(self.overhead)}){fits}>")

    def _repr_html_(self) -> str:
        return "".join(html_table(*table) for table in self.tables())

    def plot(self, contexts=None):
        """A matplotlib Figure: this estimate's parts as a stacked bar, and the total as the
        context grows (``contexts``, default 1/8x to 4x this one: KV and activations
        re-estimated, weights fixed)."""
        from memwarden._plot import GIB, figure

        contexts = sorted(contexts or {max(1, self.context * f // 8) for f in (1, 2, 4, 8, 16, 32)})
        model = getattr(self, "_description", None) or self.model  # the model as described, not only its name
        grown = [estimate(model, self.dtype, context=c, batch=self.batch, kv_dtype=self.kv_dtype) for c in contexts]
        fig = figure(9, 3.5)
        parts = (("weights", "weights", "#3b7dd8"), ("kv_cache", "KV cache", "#e8a33d"),
                 ("activations", "activations", "#6bbf59"), ("overhead", "fixed buffers", "#999999"))
        bar, line = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        bottom = 0.0
        for attr, label, color in parts:
            value = getattr(self, attr) / GIB
            bar.bar(["this estimate"], [value], bottom=bottom, label=f"{label} {value:.2f}", color=color)
            bottom += value
        bar.set_ylabel("GiB")
        bar.set_title(f"{self.model}, context {self.context} x {self.batch}", fontsize=10)
        bar.legend(fontsize=8)
        below = [0.0] * len(contexts)
        for attr, label, color in parts:
            values = [getattr(g, attr) / GIB for g in grown]
            line.fill_between(contexts, below, [b + v for b, v in zip(below, values)], label=label, color=color)
            below = [b + v for b, v in zip(below, values)]
        line.axvline(self.context, color="black", linewidth=0.8)
        line.set_xscale("log", base=2)
        line.set_xlabel("context (tokens)")
        line.set_title("total as the context grows", fontsize=10)
        return fig


def _describe(model: Any, dtype: Any):
    from memwarden.models import describe  # transformers and torch load on first use
    return describe(model, dtype)


def _bytes_by_layer(parts) -> dict:
    out: dict = {}
    for part in parts:
        out[part.layer] = out.get(part.layer, 0) + part.bytes
    return out


def estimate(model: Any, dtype: Any = None, context: int | None = None, batch: int = 1, *,
             kv_dtype: Any = "auto", prefill_chunk: int = F.DEFAULT_PREFILL_CHUNK, max_memory: Any = None,
             cuda_context: Any = F.CUDA_CONTEXT_BYTES, workspace: Any = F.WORKSPACE_BYTES,
             mla_cache: str = "latent", offload: str = "accelerate", gpu_layers: int | None = None,
             attention_scores: bool = False, all_logits: bool = False, block_size: int = 16) -> Estimate:
    """Memory needed to serve ``model`` (see the module doc).

    dtype: weight format (default: as the checkpoint stores it; a GGUF file keeps its own). kv_dtype: see
    ``memwarden.footprint.kv_format``. With ``max_memory`` (accelerate's format) the
    breakdown is per device, placed as ``offload`` says (``gpu_layers=N`` implies the
    llama.cpp mode); ``attention_scores`` and ``all_logits`` as for
    ``footprint.activation_bytes``. The room left for KV is sized as vLLM does
    (``footprint.kv_pool``, with ``prefill_chunk`` tokens in flight): ``kv_blocks`` of
    ``block_size`` tokens, ``kv_tokens`` and ``max_sequences`` of ``context`` tokens.
    """
    desc = _describe(model, dtype)
    spec = desc.spec
    warnings = list(desc.warnings)
    if context is None:
        context = spec.max_position_embeddings or 4096
    integer(context, "context")
    integer(batch, "batch")
    integer(prefill_chunk, "prefill_chunk")
    integer(block_size, "block_size")
    if spec.max_position_embeddings and context > spec.max_position_embeddings:
        warnings.append(f"context {context} is above the model's max_position_embeddings "
                        f"{spec.max_position_embeddings}: quality beyond it is not guaranteed")
    if gpu_layers is not None:
        offload = "gpu_layers"
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {OFFLOAD_MODES}, got {offload!r}")
    fmt = F.kv_format(kv_dtype, desc.dtype)
    act_bytes = 2 if desc.compute_dtype != "float32" else 4
    fixed = F.fixed_bytes(parse_bytes(cuda_context, "cuda_context"), parse_bytes(workspace, "workspace"))
    kv_layers = F.kv_layer_bytes(spec, context, batch, fmt.name, desc.dtype, mla_cache)
    state = F.state_bytes(spec, batch, act_bytes)
    cache_layers = [k + s for k, s in zip(kv_layers, state)]
    act = F.activation_bytes(spec, batch * min(context, prefill_chunk), batch, act_bytes, context=context,
                             attention_scores=attention_scores, all_logits=all_logits)
    est = Estimate(model=spec.name, dtype=desc.dtype, kv_dtype=fmt.name, context=context, batch=batch,
                   prefill_chunk=prefill_chunk, weights=desc.bytes, kv_cache=sum(cache_layers),
                   activations=act, overhead=fixed, warnings=warnings, notes=list(desc.notes),
                   block_size=block_size)
    est._description = desc  # for plot(), which prices other contexts (not a field: to_dict stays small)
    if max_memory is not None:
        if offload == "gpu_layers":
            _place_gpu_layers(est, desc, max_memory, cache_layers, fixed, gpu_layers)
        else:
            _place_accelerate(est, desc, max_memory, cache_layers, fixed)
        holders = [x for x in est.devices if x.context] or est.devices
        est.kv_budget = max(0, sum(x.memory - x.model - x.compute - x.overhead for x in holders))
        if any(layer.has_kv or layer.state_bytes(act_bytes) for layer in spec.layers):
            pool = F.kv_pool(spec, est.kv_budget, context, block_size, fmt.name, desc.dtype, mla_cache, act_bytes,
                             prefill_chunk)
            if any(layer.has_kv for layer in spec.layers):
                est.kv_blocks, est.kv_tokens = pool.num_blocks, pool.tokens
            est.max_sequences = pool.max_sequences
    elif offload == "gpu_layers":
        raise ValueError("gpu_layers needs max_memory (GPUs and 'cpu')")
    return est


def _place_accelerate(est: Estimate, desc, max_memory: Any, cache_layers: list, fixed: int) -> None:
    from memwarden import plan as P

    memory = P.parse_max_memory(max_memory)
    accelerators = [d for d in memory if d not in _SPILL]
    compute_on = accelerators or list(memory)
    n = len(compute_on)
    reserve = {d: (fixed if accelerators else 0) + est.activations + -(-est.kv_cache // n) if d in compute_on else 0
               for d in memory}
    main = compute_on[0]
    p = P.plan(desc, memory, reserve={d: min(r, memory[d] - 1) for d, r in reserve.items()},
               raise_on_infeasible=False)
    if p.feasible and accelerators and any(d in _SPILL for d in p.assignment):
        # room on the main GPU for the largest piece accelerate streams in, then plan again
        reserve[main] += max(_bytes_by_layer(desc.parts).values())
        p = P.plan(desc, memory, reserve={d: min(r, memory[d] - 1) for d, r in reserve.items()},
                   raise_on_infeasible=False)
    cache = {d: 0 for d in memory}
    model = {d: 0 for d in memory}
    streamed = 0
    if p.feasible:
        model = dict(p.load)
        spilled_parts = [part for part, device in zip(p.parts, p.assignment) if device in _SPILL]
        streamed = max(_bytes_by_layer(spilled_parts).values(), default=0) if accelerators else 0
        for layer, device in p.layer_devices.items():
            executes = main if (device in _SPILL and accelerators) else device
            cache[executes] += cache_layers[layer]
        spilled = sorted(l for l, d in p.layer_devices.items() if d in _SPILL)
        if spilled and accelerators:
            est.notes.append(
                f"accelerate: {len(spilled)} layer(s) placed on cpu/disk execute on GPU {main}: their KV "
                f"({format_bytes(sum(cache_layers[l] for l in spilled))}) is counted there, and the largest "
                f"({format_bytes(streamed)}) is streamed in while it runs")
    else:
        for d in compute_on:
            model[d] = desc.bytes // n
            cache[d] = est.kv_cache // n
        est.notes.append(f"the weights do not fit: {p.message}")
    est.placement = "accelerate"
    est.devices = [DeviceEstimate(device=d, memory=memory[d], model=model[d], context=cache[d],
                                  compute=(est.activations + (streamed if d == main else 0)) if d in compute_on else 0,
                                  overhead=fixed if d in accelerators else 0) for d in memory]
    est.fits = p.feasible and all(x.free >= 0 for x in est.devices)


def _place_gpu_layers(est: Estimate, desc, max_memory: Any, cache_layers: list, fixed: int,
                      gpu_layers: int | None) -> None:
    from memwarden import plan as P

    memory = P.parse_max_memory(max_memory)
    spec = desc.spec
    gpus = [d for d in memory if d not in _SPILL]
    if gpu_layers is None:
        raise ValueError("offload='gpu_layers' needs gpu_layers=N (decoder layers on the GPUs)")
    integer(gpu_layers, "gpu_layers", minimum=0)
    if gpu_layers > spec.num_layers:
        raise ValueError(f"gpu_layers must be at most the model's {spec.num_layers} layers, got {gpu_layers}")
    if gpu_layers and not gpus:
        raise ValueError("gpu_layers > 0 needs at least one GPU in max_memory")
    if gpu_layers < spec.num_layers and "cpu" not in memory:
        raise ValueError("gpu_layers below the layer count needs host memory: add 'cpu' to max_memory")
    total = sum(memory[g] for g in gpus)
    bounds, acc = [], 0
    for g in gpus:  # contiguous layer ranges in proportion to each GPU's memory
        acc += memory[g]
        bounds.append(round(gpu_layers * acc / total) if total else 0)

    def device_of(layer: int):
        if layer < 0:
            return "cpu" if "cpu" in memory else gpus[0]
        if layer >= spec.num_layers:
            return gpus[-1] if gpu_layers == spec.num_layers and gpus else "cpu"
        if layer >= gpu_layers:
            return "cpu"
        return gpus[next(i for i, b in enumerate(bounds) if layer < b)]

    model = {d: 0 for d in memory}
    cache = {d: 0 for d in memory}
    for part in desc.parts:
        model[device_of(part.layer)] += part.bytes
    for layer in range(spec.num_layers):
        cache[device_of(layer)] += cache_layers[layer]
    computes = set(gpus[:1]) | {device_of(layer) for layer in range(spec.num_layers)}
    est.placement = f"llama.cpp gpu_layers={gpu_layers}"
    est.notes.append(f"llama.cpp: layers 0-{gpu_layers - 1} and their KV on the GPUs, the other "
                     f"{spec.num_layers - gpu_layers} layers and their KV in host memory, where they run"
                     if gpu_layers else "llama.cpp: every layer and its KV in host memory")
    est.devices = [DeviceEstimate(device=d, memory=memory[d], model=model[d], context=cache[d],
                                  compute=est.activations if d in computes else 0,
                                  overhead=fixed if d in gpus else 0) for d in memory]
    est.fits = all(x.free >= 0 for x in est.devices)


def max_context(model: Any, max_memory: Any, batch: int = 1, dtype: Any = None, *, kv_dtype: Any = "auto",
                prefill_chunk: int = F.DEFAULT_PREFILL_CHUNK, limit: int | None = None, **placement) -> int:
    """The largest context (tokens per sequence) for which ``estimate(..., max_memory=...)``
    fits, by binary search up to ``limit`` (default: the model's max_position_embeddings,
    else 131072). Returns 0 when not even one token fits. ``placement``: ``offload``,
    ``gpu_layers``, ``mla_cache``, ``cuda_context``, ``workspace`` as for ``estimate``."""
    desc = _describe(model, dtype)
    hi = (desc.spec.max_position_embeddings or 131072) if limit is None else limit
    integer(hi, "limit")

    def fits(c: int) -> bool:
        return bool(estimate(desc, None, c, batch, kv_dtype=kv_dtype, prefill_chunk=prefill_chunk,
                             max_memory=max_memory, **placement).fits)

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
