"""The ``memwarden`` command line: will a model fit, with how much context, and where
should each piece go?

    memwarden models
    memwarden estimate MODEL [--dtype bf16] [--context 8192] [--batch 1] [--gpus 2x16GiB]
    memwarden plan MODEL --gpus 2x16GiB [--cpu 64GiB] [--reserve 2GiB|auto] [--json]
    memwarden fit MODEL --gpus 2x24GiB [--batch 1]

MODEL is an embedded name (``memwarden models``) or a path to a ``config.json`` (or a
folder holding one). Tables use ``rich`` when it is installed; ``--json`` prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from memwarden._units import format_bytes, parse_bytes

__all__ = ["main", "parse_gpus"]


def parse_gpus(text: str) -> dict:
    """``"2x16GiB"`` -> {0: 16GiB, 1: 16GiB}; ``"24GiB,16GiB"``; ``"2x24GiB,16GiB"``."""
    out: dict = {}
    for chunk in str(text).split(","):
        chunk = chunk.strip()
        if not chunk:
            raise ValueError(f"--gpus: empty entry in {text!r}")
        count = 1
        if "x" in chunk.lower() and chunk.lower().split("x", 1)[0].strip().isdigit():
            n, size = chunk.lower().split("x", 1)
            count = int(n)
            chunk = size
        if count <= 0:
            raise ValueError(f"--gpus: device count must be positive in {text!r}")
        size = parse_bytes(chunk, "--gpus size")
        if size <= 0:
            raise ValueError(f"--gpus: memory must be > 0 in {text!r}")
        for _ in range(count):
            out[len(out)] = size
    return out


def _table(title: str, header: list, rows: list, footer: list | None = None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        print(title)
        allr = [header] + rows
        w = [max(len(str(r[i])) for r in allr) for i in range(len(header))]
        for r in allr:
            print("  " + "  ".join(str(c).rjust(x) for c, x in zip(r, w)))
        for line in footer or []:
            print("  " + line)
        return
    t = Table(title=title, title_justify="left")
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[str(c) for c in r])
    console = Console()
    console.print(t)
    for line in footer or []:
        console.print(line, highlight=False)


def _memory(args) -> dict:
    mem = dict(parse_gpus(args.gpus)) if args.gpus else {}
    if getattr(args, "cpu", None):
        mem["cpu"] = parse_bytes(args.cpu, "--cpu")
    if getattr(args, "disk", None):
        mem["disk"] = parse_bytes(args.disk, "--disk")
    return mem


def _cmd_models(args) -> int:
    from memwarden import models as M

    rows = []
    out = []
    for m in M.list_models():
        d = M.describe(m["name"])
        s = d.spec
        info = {"name": m["name"], "model_type": s.model_type, "params": d.params,
                "published_params": m["published_params"], "layers": s.num_layers,
                "experts": s.num_experts, "experts_per_token": s.experts_per_token,
                "bf16_bytes": d.bytes, "int4_bytes": M.describe(m["name"], "int4").bytes}
        out.append(info)
        rows.append([m["name"], s.model_type, f"{d.params / 1e9:.2f}B", str(s.num_layers),
                     f"{s.num_experts} (top {s.experts_per_token})" if s.num_experts else "-",
                     format_bytes(info["bf16_bytes"]), format_bytes(info["int4_bytes"])])
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _table("embedded models", ["name", "type", "params", "layers", "experts", "bf16", "int4"], rows)
    return 0


def _cmd_estimate(args) -> int:
    from memwarden.estimate import estimate

    mem = _memory(args) or None
    est = estimate(args.model, args.dtype, args.context, args.batch, kv_dtype=args.kv_dtype,
                   prefill_chunk=args.prefill_chunk, max_memory=mem)
    if args.json:
        print(est.to_json(indent=2))
        return 0
    _table(f"{est.model}: {est.dtype} weights, {est.kv_dtype} KV, context {est.context} x batch {est.batch}",
           ["part", "bytes"], est.rows())
    if est.devices:
        _table("per device", ["device", "memory", "model", "context", "compute", "free"], est.device_rows(),
               ["fits" if est.fits else "DOES NOT FIT"])
    return 0 if est.fits in (None, True) else 1


def _cmd_plan(args) -> int:
    from memwarden.plan import plan

    mem = _memory(args)
    if not mem:
        raise ValueError("plan needs --gpus (e.g. --gpus 2x16GiB)")
    reserve = args.reserve
    p = plan(args.model, mem, args.dtype, reserve, balance=args.balance, context=args.context,
             batch=args.batch, raise_on_infeasible=False)
    if args.json:
        print(p.to_json(indent=2))
        return 0 if p.feasible else 1
    if not p.feasible:
        print(p.report())
        return 1
    footer = [f"imbalance {100 * p.imbalance:.3f}%   peak {format_bytes(p.peak_bytes)}   "
              f"planned in {1000 * p.seconds:.1f} ms"]
    if p.split_layers():
        footer.append(f"experts of {len(p.split_layers())} layer(s) span devices: load with the device_map, "
                      "then memwarden.plan.apply(model, plan) splits them")
    _table(f"plan for {p.model} ({p.dtype})",
           ["device", "memory", "reserve", "weights", "free", "used", "layers", "experts"], p.rows(), footer)
    if args.device_map:
        print(json.dumps({k: v for k, v in p.to_device_map().items()}, indent=2))
    return 0


def _cmd_fit(args) -> int:
    from memwarden.estimate import estimate, max_context

    mem = _memory(args)
    if not mem:
        raise ValueError("fit needs --gpus (e.g. --gpus 2x24GiB)")
    ctx = max_context(args.model, mem, args.batch, args.dtype, kv_dtype=args.kv_dtype,
                      prefill_chunk=args.prefill_chunk)
    if args.json:
        out = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "max_context": ctx}
        if ctx:
            out["estimate"] = estimate(args.model, args.dtype, ctx, args.batch, kv_dtype=args.kv_dtype,
                                       prefill_chunk=args.prefill_chunk, max_memory=mem).to_dict()
        print(json.dumps(out, indent=2))
        return 0 if ctx else 1
    if not ctx:
        print(f"{args.model} ({args.dtype}) does not fit on these devices, not even with 1 token of context")
        return 1
    est = estimate(args.model, args.dtype, ctx, args.batch, kv_dtype=args.kv_dtype,
                   prefill_chunk=args.prefill_chunk, max_memory=mem)
    _table(f"{est.model} ({est.dtype}, batch {args.batch}): largest context {ctx} tokens",
           ["device", "memory", "model", "context", "compute", "free"], est.device_rows())
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memwarden", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, gpus_required=False):
        p.add_argument("model", help="embedded model name or path to config.json")
        p.add_argument("--dtype", default="bfloat16", help="weights: bf16, fp16, fp32, int8, int4")
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--gpus", required=gpus_required, help="e.g. 2x16GiB or 24GiB,16GiB")
        p.add_argument("--cpu", help="CPU memory for spill, e.g. 64GiB")
        p.add_argument("--disk", help="disk for spill")
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("models", help="list the embedded model configs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_models)

    p = sub.add_parser("estimate", help="memory needed: weights, KV cache, activations, buffers")
    common(p)
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: model max)")
    p.add_argument("--kv-dtype", default=None)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.set_defaults(fn=_cmd_estimate)

    p = sub.add_parser("plan", help="balanced placement of layers and experts on devices")
    common(p, gpus_required=True)
    p.add_argument("--reserve", default=None, help="bytes kept free per GPU, or 'auto' (KV + activations)")
    p.add_argument("--context", type=int, default=None, help="context for --reserve auto")
    p.add_argument("--balance", choices=["bytes", "capacity"], default="bytes")
    p.add_argument("--device-map", action="store_true", help="also print the device_map")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("fit", help="largest context that fits")
    common(p, gpus_required=True)
    p.add_argument("--kv-dtype", default=None)
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.set_defaults(fn=_cmd_fit)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"memwarden {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
