"""Planner benchmark: memwarden.plan vs accelerate.infer_auto_device_map.

For Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3 (bf16 and int4) on 2, 4 and 8 equal and
unequal devices: imbalance ((max - min) / mean of the devices' weight bytes), peak device
bytes and planning time of both. accelerate plans the transformers model built on the
meta device, with decoder layers unsplittable (its usual no_split_module_classes), under
the same max_memory (scaled by accelerate's own model size / memwarden's, which only
matters for int4, where accelerate counts 0.5 B for every weight); both device maps are then measured with memwarden's part sizes, so
the bytes are comparable. Budgets: equal = 1.10 x model / n per device; unequal = the
first half of the devices 1.35 x, the rest 0.85 x model / n.

    python benchmarks/bench_planner.py [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"]
DTYPES = ["bfloat16", "int4"]
NDEVS = [2, 4, 8]


def budgets(total: int, n: int, kind: str) -> dict:
    if kind == "equal":
        return {i: int(1.10 * total / n) for i in range(n)}
    return {i: int((1.35 if i < n // 2 else 0.85) * total / n) for i in range(n)}


def meta_model(name: str):
    import transformers
    from memwarden import models as M
    cfg = {k: v for k, v in M.load_config(name).items() if not k.startswith("_")}
    conf = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    return model, list(model._no_split_modules or [])


def loads_of(device_map: dict, desc, devices) -> dict:
    """memwarden part sizes summed per device of an accelerate device_map."""
    keys = sorted(device_map, key=len, reverse=True)
    load = {d: 0 for d in devices}
    load.update({"cpu": 0, "disk": 0})
    for p in desc.parts:
        mod = p.modules[0] if p.kind == "expert" else None
        for t in p.tensors:
            name = mod or t.name.split("[")[0]
            dev = next((device_map[k] for k in keys if k == "" or name == k or name.startswith(k + ".")), None)
            load[dev] = load.get(dev, 0) + t.nbytes(desc.dtype, 2) if dev is not None else load.get(dev, 0)
    return load


def imbalance(loads: list) -> float:
    mean = sum(loads) / len(loads)
    return (max(loads) - min(loads)) / mean if mean else 0.0


def run(quick: bool) -> list:
    import accelerate
    from memwarden import models as M
    from memwarden import plan as P

    models = ["mixtral-8x7b", "qwen3-30b-a3b"] if quick else MODELS
    dtypes = ["bfloat16"] if quick else DTYPES
    ndevs = [2, 4] if quick else NDEVS
    kinds = ["equal"] if quick else ["equal", "unequal"]
    rows = []
    for name in models:
        model, no_split = meta_model(name)
        for dtype in dtypes:
            desc = M.describe(name, dtype)
            acc_dtype = torch.bfloat16 if dtype == "bfloat16" else "int4"
            # accelerate sizes int4 its own way (every weight 0.5 B, no scales, embeddings too):
            # give it the same budget relative to the model size it computes.
            acc_total = accelerate.utils.compute_module_sizes(model, dtype=acc_dtype)[""]
            scale = acc_total / desc.bytes
            for n in ndevs:
                for kind in kinds:
                    mem = budgets(desc.bytes, n, kind)
                    t = time.perf_counter()
                    p = P.plan(desc, mem, raise_on_infeasible=False)
                    mw_wall = time.perf_counter() - t
                    t = time.perf_counter()
                    try:
                        dm = accelerate.infer_auto_device_map(model, max_memory={k: int(v * scale) for k, v in mem.items()},
                                                              dtype=acc_dtype,
                                                              no_split_module_classes=no_split)
                        acc_err = None
                    except Exception as e:  # noqa: BLE001
                        dm, acc_err = None, f"{type(e).__name__}: {e}"
                    acc_wall = time.perf_counter() - t
                    row = {"model": name, "dtype": dtype, "devices": n, "budget": kind,
                           "max_memory": mem, "model_bytes": desc.bytes,
                           "memwarden": {"feasible": p.feasible, "imbalance": p.imbalance if p.feasible else None,
                                         "peak_bytes": p.peak_bytes if p.feasible else None,
                                         "seconds": mw_wall, "core_seconds": p.seconds,
                                         "split_layers": len(p.split_layers()) if p.feasible else None}}
                    if dm is not None:
                        load = loads_of(dm, desc, list(mem))
                        gpu = [load[d] for d in mem]
                        row["accelerate"] = {"imbalance": imbalance(gpu), "peak_bytes": max(gpu),
                                             "offloaded_bytes": load.get("cpu", 0) + load.get("disk", 0),
                                             "seconds": acc_wall}
                    else:
                        row["accelerate"] = {"error": acc_err, "seconds": acc_wall}
                    rows.append(row)
                    print(fmt_row(row), flush=True)
        del model
    return rows


HEADER = (f"{'model':<14} {'dtype':<8} {'n':>2} {'budget':<7} | {'mw imb':>8} {'mw peak':>10} {'mw ms':>7} | "
          f"{'acc imb':>8} {'acc peak':>10} {'acc ms':>8} {'acc off':>9}")


def fmt_row(r: dict) -> str:
    g = 2**30
    m, a = r["memwarden"], r["accelerate"]
    mw = (f"{100 * m['imbalance']:7.3f}% {m['peak_bytes'] / g:9.2f}G" if m["feasible"] else f"{'no fit':>8} {'':>10}")
    if "error" in a:
        ac = f"{'error':>8} {'':>10} {1000 * a['seconds']:8.1f} {'':>9}"
    else:
        ac = (f"{100 * a['imbalance']:7.3f}% {a['peak_bytes'] / g:9.2f}G {1000 * a['seconds']:8.1f} "
              f"{a['offloaded_bytes'] / g:8.2f}G")
    return (f"{r['model']:<14} {r['dtype']:<8} {r['devices']:>2} {r['budget']:<7} | {mw} {1000 * m['seconds']:7.1f} | {ac}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke run (< 30 s)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "bench_planner.json"))
    args = ap.parse_args(argv)
    print(HEADER)
    rows = run(args.quick)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"quick": args.quick, "torch": torch.__version__, "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
