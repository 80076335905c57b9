"""The ``memwarden`` command line: will a model fit, with how much context, and where
should each piece go?

    memwarden models
    memwarden estimate MODEL [--dtype bf16] [--context 8192] [--batch 1] [--gpus 2x16GiB] [--cpu 64GiB]
    memwarden plan MODEL --gpus 2x16GiB [--cpu 64GiB] [--reserve 2GiB|auto] [--json]
    memwarden fit MODEL --gpus 2x24GiB [--batch 1] [--gpu-layers N --cpu 64GiB]
    memwarden serve [MODEL] [--model A --model B ...] [--swap-policy memwarden] [--max-memory 2GiB]
                    [--host 127.0.0.1 --port 8000] [--config FILE] [--policy memwarden] [--max-requests N]
                    [--print-config]
    memwarden serve --upstream URL [--upstream-model NAME|CONFIG] [--upstream-poll-interval S]
                    [--upstream-timeout S] [...]
    memwarden top [--url http://127.0.0.1:8000] [--interval 1] [--sessions 5] [--once]

MODEL is an embedded name (``memwarden models``), a ``config.json`` (or a folder holding
one), a GGUF file or a Hugging Face hub id (only its config.json is read). Sizes need a
unit (``48GiB``, ``500MB``). Tables use ``rich`` on a terminal when it is installed and
plain text, never cut, when piped; ``--json`` prints JSON. ``--help``, ``--version`` and
``models`` do not import torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from memwarden import top
from memwarden._table import render
from memwarden._units import parse_bytes
from memwarden._version import __version__

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


def _memory(args) -> dict:
    mem = dict(parse_gpus(args.gpus)) if args.gpus else {}
    if getattr(args, "cpu", None):
        mem["cpu"] = parse_bytes(args.cpu, "--cpu")
    if getattr(args, "disk", None):
        mem["disk"] = parse_bytes(args.disk, "--disk")
    return mem


def _cmd_models(args) -> int:
    from memwarden.models import list_models

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    rows = [[m["name"], m["model_type"], str(m["layers"]),
             f"{m['experts']} (top {m['experts_per_token']})" if m["experts"] else "-", str(m["context"]),
             f"{m['published_params'] / 1e9:.2f}B" if m["published_params"] else "-"] for m in models]
    render("embedded models (memwarden estimate NAME prices them from transformers' own classes)",
           ["name", "type", "layers", "experts", "context", "published params"], rows)
    return 0


def _placement(args) -> dict:
    return {"kv_dtype": args.kv_dtype, "mla_cache": args.mla_cache, "offload": args.offload,
            "gpu_layers": args.gpu_layers, "prefill_chunk": args.prefill_chunk}


def _cmd_estimate(args) -> int:
    from memwarden.estimate import estimate

    mem = _memory(args) or None
    est = estimate(args.model, args.dtype, args.context, args.batch, max_memory=mem, block_size=args.block_size,
                   **_placement(args))
    if args.json:
        print(est.to_json(indent=2))
        return 0 if est.fits in (None, True) else 1
    for table in est.tables():
        render(*table)
    return 0 if est.fits in (None, True) else 1


def _cmd_plan(args) -> int:
    from memwarden.plan import plan

    mem = _memory(args)
    p = plan(args.model, mem, args.dtype, args.reserve, balance=args.balance, context=args.context,
             batch=args.batch, kv_dtype=args.kv_dtype, raise_on_infeasible=False)
    if args.json:
        print(p.to_json(indent=2))
        return 0 if p.feasible else 1
    render(*p.table())
    if args.device_map and p.feasible:
        print(json.dumps(p.to_device_map(), indent=2))
    return 0 if p.feasible else 1


def _cmd_fit(args) -> int:
    from memwarden.estimate import estimate, max_context
    from memwarden.models import describe

    mem = _memory(args)
    desc = describe(args.model, args.dtype)
    placement = _placement(args)
    ctx = max_context(desc, mem, args.batch, **placement)
    model_max = desc.spec.max_position_embeddings
    at_max = bool(ctx) and ctx == (model_max or 131072)
    est = estimate(desc, None, ctx, args.batch, max_memory=mem, **placement) if ctx else None
    if args.json:
        out = {"model": desc.spec.name, "dtype": desc.dtype, "batch": args.batch, "max_context": ctx,
               "stopped_at_model_maximum": at_max, "estimate": est.to_dict() if est else None}
        print(json.dumps(out, indent=2))
        return 0 if ctx else 1
    if not ctx:
        print(f"{desc.spec.name} ({desc.dtype}) does not fit on these devices, not even with 1 token of context")
        return 1
    why = (f" (the model's maximum, max_position_embeddings={model_max}: more memory would not help)"
           if at_max and model_max else " (stopped at 131072: the config names no maximum)" if at_max else "")
    render(f"{desc.spec.name} ({desc.dtype}, batch {args.batch}): largest context {ctx} tokens{why}",
           list(est.DEVICE_HEADER), est.device_rows(), est.footer())
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memwarden", description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", action="version", version=f"memwarden {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p, gpus_required=False):
        p.add_argument("model", help="embedded name, config.json (or its folder), GGUF file or hub id")
        p.add_argument("--dtype", default=None,
                       help="weights: bf16, fp16, fp32, int8, int4, fp8, mxfp4 (default: as the checkpoint stores them)")
        p.add_argument("--batch", type=int, default=1)
        p.add_argument("--gpus", required=gpus_required, help="e.g. 2x16GiB or 24GiB,16GiB")
        p.add_argument("--cpu", help="host memory for spilled layers, e.g. 64GiB")
        p.add_argument("--disk", help="disk for spilled layers")
        p.add_argument("--kv-dtype", default="auto", help="KV cache: auto, bf16, fp16, fp32, fp8, fp8_e5m2, int8, "
                       "int8_per_token_head, int4")
        p.add_argument("--json", action="store_true", help="print JSON")

    def placement(p):
        p.add_argument("--prefill-chunk", type=int, default=2048)
        p.add_argument("--mla-cache", choices=["latent", "per_head"], default="latent",
                       help="MLA layers: compressed latent (vLLM, transformers 5) or K/V decompressed per head")
        p.add_argument("--offload", choices=["accelerate", "gpu_layers"], default="accelerate",
                       help="accelerate: spilled layers run on GPU 0, their KV there; gpu_layers: llama.cpp -ngl")
        p.add_argument("--gpu-layers", type=int, default=None, help="llama.cpp mode: first N layers on the GPUs")

    p = sub.add_parser("models", help="list the embedded model configs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_models)

    p = sub.add_parser("estimate", help="memory needed: weights, KV cache, activations, buffers")
    common(p)
    placement(p)
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: model max)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size for the vLLM-style sizing")
    p.set_defaults(fn=_cmd_estimate)

    p = sub.add_parser("plan", help="balanced placement of layers and experts on devices")
    common(p, gpus_required=True)
    p.add_argument("--reserve", default=None, help="bytes kept free per GPU, or 'auto' (KV + activations)")
    p.add_argument("--context", type=int, default=None, help="context for --reserve auto")
    p.add_argument("--balance", choices=["bytes", "capacity"], default="bytes")
    p.add_argument("--device-map", action="store_true", help="also print the device_map")
    p.set_defaults(fn=_cmd_plan)

    p = sub.add_parser("serve", help="OpenAI-compatible server under the memory controller")
    p.add_argument("model", nargs="?", default=None,
                   help="a local model folder or hub id (default: an embedded tiny model, no download)")
    p.add_argument("--model", dest="models", action="append", default=None,
                   help="a model to serve, repeatable: several share the device, swapped in and out by demand")
    p.add_argument("--swap-policy", default=None, help="with several models: memwarden, ollama, lru, never")
    p.add_argument("--max-memory", default=None,
                   help="KV cache budget, e.g. 2GiB (default 512MiB); with several models, their weights' budget")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; others need allow_remote)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--policy", default=None, help="admission policy: memwarden, reserve, optimistic, admit_all, "
                   "lookahead (for --upstream vLLM)")
    p.add_argument("--config", default=None, help="a TOML file of settings (see docs/serve.md)")
    p.add_argument("--max-requests", type=int, default=None, help="stop after this many responses")
    p.add_argument("--print-config", action="store_true", help="print the effective settings and their sources")
    p.add_argument("--upstream", default=None,
                   help="proxy generation to this OpenAI-compatible engine (vLLM), e.g. http://127.0.0.1:8001")
    p.add_argument("--upstream-model", default=None,
                   help="the upstream's model, to price its KV: a local folder, config.json or embedded name "
                        "(default: its served name as a hub id)")
    p.add_argument("--upstream-poll-interval", type=float, default=None,
                   help="seconds between reads of the upstream's /metrics (default 1)")
    p.add_argument("--upstream-timeout", type=float, default=None,
                   help="seconds to wait for the upstream's response or next chunk (default 300)")
    p.set_defaults(fn=_cmd_serve)

    p = sub.add_parser("top", help="live view of device, allocator and server memory (q quits)")
    p.add_argument("--url", type=top.server_url, default=None,
                   help="a running memwarden serve, e.g. http://127.0.0.1:8000: its sessions, KV and admission")
    p.add_argument("--interval", type=top.refresh_interval, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    p.add_argument("--sessions", type=top.session_count, default=5, metavar="N",
                   help="sessions listed, largest KV first (default 5)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (also when stdout is not a tty)")
    p.set_defaults(fn=_cmd_top)

    p = sub.add_parser("fit", help="largest context that fits")
    common(p, gpus_required=True)
    placement(p)
    p.set_defaults(fn=_cmd_fit)
    return ap


def _cmd_serve(args) -> int:
    from memwarden.controller.config import MemwardenConfig

    models = ([args.model] if args.model else []) + (args.models or [])
    overrides = {"server.model": models[0] if len(models) == 1 else None,
                 "server.models": models if len(models) > 1 else None, "server.swap_policy": args.swap_policy,
                 "server.max_memory": args.max_memory, "server.host": args.host, "server.port": args.port,
                 "admission.policy": args.policy, "server.upstream": args.upstream,
                 "server.upstream_model": args.upstream_model,
                 "server.upstream_poll_interval": args.upstream_poll_interval,
                 "server.upstream_timeout": args.upstream_timeout}
    config = MemwardenConfig.load(args.config, overrides=overrides)
    if args.print_config:
        print(config.describe())
        return 0
    import logging

    from memwarden.serve.server import Server

    # the controller's decisions, level changes and evictions: one JSON object per line
    events = logging.getLogger("memwarden.controller")
    events.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    events.addHandler(handler)
    server = Server(config, max_requests=args.max_requests)
    thread = server.start()
    print(server.describe(), flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.stop(thread)
    return 0


def _cmd_top(args) -> int:
    return top.run(args.url, args.interval, args.once, args.sessions)


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"memwarden {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `memwarden ... --json | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
