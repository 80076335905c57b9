"""Balanced placement of a model's layers and individual experts on devices.

>>> import memwarden.plan as mp
>>> p = mp.plan("mixtral-8x7b", max_memory={0: "48GiB", 1: "48GiB"}, dtype="bfloat16")
>>> print(p.report())
>>> device_map = p.to_device_map()      # for from_pretrained(device_map=...) / accelerate

Dense parts keep pipeline order (embeddings on the first device, the head on the
last); routed experts are placed one by one so that the devices' totals are as equal
as the expert sizes allow. The planner runs in C++ (``memwarden._C.plan``).

Since transformers 5 keeps a layer's experts in fused 3-D tensors, a ``device_map``
cannot split them: ``to_device_map()`` puts each fused experts module on the device
that holds most of its experts, and ``apply(model, plan)`` performs the per-expert
split on a loaded model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from memwarden._devices import SPILL_DEVICES as _SPILL
from memwarden._devices import device_key, device_order
from memwarden._native import load as load_native
from memwarden._table import format_table, html_table
from memwarden._units import format_bytes, parse_bytes

__all__ = ["plan", "Plan", "InfeasiblePlanError", "apply", "parse_max_memory", "parse_reserve"]


class InfeasiblePlanError(ValueError):
    """The model does not fit; ``.plan`` holds the attempt, ``.shortfall`` the missing bytes."""

    def __init__(self, message: str, plan: "Plan"):
        super().__init__(message)
        self.plan = plan
        self.shortfall = plan.shortfall


def parse_max_memory(max_memory: Any) -> dict:
    """accelerate-style ``{0: "16GiB", 1: 16e9, "cpu": "64GiB"}`` (or a list of sizes for
    GPUs 0..n-1) -> ``{device: bytes}`` in accelerate's order (GPUs, mps, cpu, disk)."""
    if isinstance(max_memory, (list, tuple)):
        max_memory = dict(enumerate(max_memory))
    if not isinstance(max_memory, Mapping) or not max_memory:
        raise ValueError(f"max_memory must be a non-empty dict like {{0: '16GiB', 1: '16GiB'}}, got {max_memory!r}")
    out = {}
    for k, v in max_memory.items():
        key = device_key(k, "max_memory key")
        if key in out:
            raise ValueError(f"max_memory: device {key!r} given twice")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
            raise ValueError(f"max_memory[{k!r}] must be > 0, got {v!r}")
        b = parse_bytes(v, f"max_memory[{k!r}]")
        if b <= 0:
            raise ValueError(f"max_memory[{k!r}] must be > 0, got {v!r}")
        out[key] = b
    return {k: out[k] for k in sorted(out, key=device_order)}


def parse_reserve(reserve: Any, memory: Mapping) -> dict:
    """Bytes reserved per device (KV cache, activations, CUDA context): one size for every
    accelerator, or a dict per device. Spill devices (cpu, disk) get no default reserve."""
    out = {k: 0 for k in memory}
    if reserve is None:
        return out
    if isinstance(reserve, Mapping):
        for k, v in reserve.items():
            key = device_key(k, "reserve key")
            if key not in memory:
                raise ValueError(f"reserve: device {key!r} is not in max_memory ({list(memory)})")
            out[key] = parse_bytes(v, f"reserve[{k!r}]")
    else:
        b = parse_bytes(reserve, "reserve")
        for k in memory:
            if k not in _SPILL:
                out[k] = b
    for k, r in out.items():
        if r >= memory[k]:
            raise ValueError(
                f"reserve for device {k!r} ({format_bytes(r)}) must be smaller than its memory "
                f"({format_bytes(memory[k])})")
    return out


# the weights of each part kind, bottom to top in the plot (kinds as memwarden.models.Part names them)
_KIND_COLORS = {"embed": "#9ecae1", "attn": "#3b7dd8", "mlp": "#08519c", "moe": "#74a9cf", "expert": "#2b8cbe",
                "head": "#c6dbef"}
_KIND_LABELS = {"embed": "embeddings", "attn": "attention", "mlp": "dense MLP", "moe": "MoE router, shared",
                "expert": "routed experts", "head": "head"}


@dataclass
class Plan:
    """Where every part of a model goes, and how full each device is."""

    model: str
    dtype: str
    devices: list                 # device keys in pipeline order
    memory: dict                  # device -> bytes
    reserve: dict                 # device -> bytes
    load: dict                    # device -> weight bytes placed
    target: dict                  # device -> balanced target bytes
    parts: list = field(repr=False)        # memwarden.models.Part
    assignment: list = field(repr=False)   # device key per part (None when infeasible)
    feasible: bool = True
    shortfall: int = 0
    message: str = ""
    imbalance: float = 0.0
    seconds: float = 0.0
    strategy: str = ""
    num_layers: int = 0
    notes: list = field(default_factory=list)   # what the plan assumed (reserve="auto")

    # --- views ----------------------------------------------------------------
    @property
    def capacity(self) -> dict:
        return {d: self.memory[d] - self.reserve[d] for d in self.devices}

    @property
    def peak_bytes(self) -> int:
        """Largest weight bytes on one accelerator (any device if all spill)."""
        acc = [d for d in self.devices if d not in _SPILL] or self.devices
        return max(self.load[d] for d in acc)

    def placement(self) -> dict:
        """part name -> device."""
        return {p.name: d for p, d in zip(self.parts, self.assignment)}

    @property
    def layer_devices(self) -> dict:
        """layer index -> device of its attention (the pipeline position of the layer)."""
        return {p.layer: d for p, d in zip(self.parts, self.assignment) if p.kind == "attn"}

    @property
    def expert_devices(self) -> dict:
        """MoE layer index -> list of devices, one per expert."""
        out: dict = {}
        for p, d in zip(self.parts, self.assignment):
            if p.kind == "expert":
                out.setdefault(p.layer, {})[p.expert] = d
        return {l: [v[e] for e in sorted(v)] for l, v in out.items()}

    def split_layers(self) -> list:
        """MoE layers whose experts span more than one device (need ``apply``)."""
        return [l for l, ds in self.expert_devices.items() if len(set(ds)) > 1]

    def to_device_map(self) -> dict:
        """A ``device_map`` for ``from_pretrained``/accelerate. Fused expert modules
        go to the device holding most of their experts (ties: the layer's device)."""
        if not self.feasible:
            raise InfeasiblePlanError(self.message, self)
        dm: dict = {}
        experts: dict = {}
        layer_dev = self.layer_devices
        for p, d in zip(self.parts, self.assignment):
            if p.kind == "expert":
                experts.setdefault(p.modules[0], {"layer": p.layer, "count": {}})["count"].setdefault(d, 0)
                experts[p.modules[0]]["count"][d] += p.bytes + 1
                continue
            for m in p.modules:
                dm.setdefault(m, d)
        for m, info in experts.items():
            count = info["count"]
            home = layer_dev.get(info["layer"])
            best = max(count.items(), key=lambda kv: (kv[1], kv[0] == home))[0]
            dm[m] = best
        return dm

    def to_dict(self) -> dict:
        return {
            "model": self.model, "dtype": self.dtype, "feasible": self.feasible,
            "shortfall_bytes": self.shortfall, "message": self.message,
            "imbalance": self.imbalance, "peak_bytes": self.peak_bytes if self.feasible else None,
            "seconds": self.seconds, "strategy": self.strategy,
            "devices": [
                {"device": d, "memory": self.memory[d], "reserve": self.reserve[d],
                 "capacity": self.capacity[d], "weights": self.load[d], "target": self.target[d],
                 "free": self.capacity[d] - self.load[d],
                 "layers": sorted(l for l, x in self.layer_devices.items() if x == d),
                 "experts": sum(1 for p, x in zip(self.parts, self.assignment) if x == d and p.kind == "expert")}
                for d in self.devices],
            "layers": {str(k): v for k, v in self.layer_devices.items()},
            "experts": {str(k): v for k, v in self.expert_devices.items()},
            "device_map": self.to_device_map() if self.feasible else None,
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def _ranges(self, layers: list) -> str:
        if not layers:
            return "-"
        out, start, prev = [], layers[0], layers[0]
        for x in layers[1:] + [None]:
            if x is not None and x == prev + 1:
                prev = x
                continue
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            if x is not None:
                start = prev = x
        return ",".join(out)

    def rows(self) -> list:
        """One row per device: device, memory, reserve, weights, free, use %, layers, experts."""
        d2 = self.to_dict()
        rows = []
        for r in d2["devices"]:
            use = (r["weights"] + r["reserve"]) / r["memory"] if r["memory"] else 0.0
            rows.append([str(r["device"]), format_bytes(r["memory"]), format_bytes(r["reserve"]),
                         format_bytes(r["weights"]), format_bytes(r["free"]), f"{100 * use:.1f}%",
                         self._ranges(r["layers"]), str(r["experts"])])
        return rows

    HEADER = ("device", "memory", "reserve", "weights", "free", "used", "layers", "experts")

    def title(self) -> str:
        return f"plan for {self.model} ({self.dtype}): " + ("fits" if self.feasible else "DOES NOT FIT")

    def footer(self) -> list:
        """Summary lines under the table: balance, what reserve="auto" assumed, splits."""
        if not self.feasible:
            return [self.message] + self.notes
        lines = [f"imbalance {100 * self.imbalance:.3f}%  peak {format_bytes(self.peak_bytes)}  "
                 f"planned in {1000 * self.seconds:.1f} ms ({self.strategy})"] + self.notes
        split = self.split_layers()
        if split:
            lines.append(f"experts of {len(split)} layer(s) span devices: load with the device_map, then "
                         "memwarden.plan.apply(model, plan) splits them (a device_map keeps each fused "
                         "experts module whole)")
        return lines

    def table(self) -> tuple:
        """(title, header, rows, footer); an infeasible plan has only its title and footer."""
        if not self.feasible:
            return self.title(), [], [], self.footer()
        return self.title(), list(self.HEADER), self.rows(), self.footer()

    def report(self) -> str:
        return format_table(*self.table())

    def __str__(self) -> str:
        return self.report()

    def _repr_html_(self) -> str:
        return html_table(*self.table())

    def plot(self):
        """A matplotlib Figure: per device, stacked bars of the weights placed by part kind
        (embeddings, attention, dense MLP, routed experts, shared MoE parts, head), the
        reserve (KV cache and activations) and what is left free, against the balanced
        target; the imbalance in the title."""
        from memwarden._plot import GIB, figure

        fig = figure(max(5.0, 1.2 * len(self.devices) + 3), 3.5)
        ax = fig.add_subplot()
        names = [str(d) for d in self.devices]
        by_kind: dict[str, dict] = {}
        for part, device in zip(self.parts, self.assignment if self.feasible else []):
            kind = by_kind.setdefault(part.kind, dict.fromkeys(self.devices, 0))
            kind[device] += part.bytes
        bottom = [0.0] * len(self.devices)
        for kind, color in _KIND_COLORS.items():
            if kind in by_kind:
                heights = [by_kind[kind][d] / GIB for d in self.devices]
                ax.bar(names, heights, bottom=bottom, label=_KIND_LABELS[kind], color=color)
                bottom = [b + h for b, h in zip(bottom, heights)]
        reserve = [self.reserve[d] / GIB for d in self.devices]
        free = [max(0, self.capacity[d] - self.load[d]) / GIB for d in self.devices]
        ax.bar(names, reserve, bottom=bottom, label="reserve (KV, activations)", color="#e8a33d")
        ax.bar(names, free, bottom=[b + r for b, r in zip(bottom, reserve)], label="free", color="#dddddd")
        if self.feasible:
            ax.scatter(names, [self.target[d] / GIB for d in self.devices], marker="_", s=600, color="black",
                       label="balanced target", zorder=3)
        ax.set_ylabel("GiB")
        state = f"imbalance {100 * self.imbalance:.2f}%" if self.feasible else "DOES NOT FIT"
        ax.set_title(f"plan for {self.model} ({self.dtype}): {state}", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not on them
        return fig


def plan(model: Any, max_memory: Any, dtype: Any = None, reserve: Any = None, *,
         balance: str = "bytes", locality: bool = True, context: int | None = None, batch: int = 1,
         kv_dtype: Any = "auto", raise_on_infeasible: bool = True, compute_dtype: Any = "bfloat16") -> Plan:
    """Plan where each part of ``model`` goes.

    model: anything ``memwarden.models.describe`` takes (an embedded name, a config.json
      path, a hub id, a GGUF file, a dict, a ``transformers`` config) or a
      ``memwarden.models.ModelDescription``.
    max_memory: accelerate's format, ``{0: "16GiB", 1: "16GiB", "cpu": "64GiB"}``.
    dtype: weight format (default bfloat16; int8, int4, fp8, mxfp4, ...; a GGUF file keeps its own).
    reserve: bytes kept free per accelerator (one size or a dict per device); ``"auto"``
      reserves the KV cache for ``context`` x ``batch`` tokens (split evenly), activations
      and fixed buffers (``memwarden.footprint.auto_reserve``; ``Plan.notes`` says what it
      assumed).
    balance: ``"bytes"`` (equal weight bytes, water filling under capacities) or
      ``"capacity"`` (bytes proportional to each device's capacity).
    Raises ``InfeasiblePlanError`` (a ValueError) when the model does not fit, unless
    ``raise_on_infeasible=False``.
    """
    from memwarden import footprint
    from memwarden import models as M

    desc = model if isinstance(model, M.ModelDescription) else M.describe(model, dtype, compute_dtype)
    memory = parse_max_memory(max_memory)
    notes = []
    if isinstance(reserve, str) and reserve.strip().lower() == "auto":
        reserve, note = footprint.auto_reserve(desc.spec, list(memory), context=context, batch=batch,
                                               weights_dtype=desc.dtype, kv_dtype=kv_dtype)
        notes.append(note)
    res = parse_reserve(reserve, memory)
    devices = list(memory)
    caps = [memory[d] - res[d] for d in devices]
    spill = [d in _SPILL for d in devices]
    parts = desc.parts
    r = load_native().plan.plan([p.bytes for p in parts], [p.layer for p in parts], [p.is_expert for p in parts],
                     caps, spill, balance=balance, locality=locality)
    assignment = [devices[i] if i >= 0 else None for i in r["device"]]
    out = Plan(model=desc.spec.name, dtype=desc.dtype, devices=devices, memory=memory, reserve=res,
               load=dict(zip(devices, r["load"])), target=dict(zip(devices, r["target"])),
               parts=parts, assignment=assignment, feasible=r["feasible"], shortfall=r["shortfall"],
               message=r["message"], imbalance=r["imbalance"], seconds=r["seconds"], strategy=r["strategy"],
               num_layers=desc.spec.num_layers, notes=notes)
    if not out.feasible and raise_on_infeasible:
        raise InfeasiblePlanError(f"{desc.spec.name} ({desc.dtype}) does not fit: {out.message}", out)
    return out


def apply(model, plan: Plan, devices: Mapping | None = None):
    """Split fused experts across the planned devices; see ``memwarden.plan._apply``."""
    from memwarden.plan._apply import apply as _apply
    return _apply(model, plan, devices)
