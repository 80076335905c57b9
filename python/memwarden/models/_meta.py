"""Parts of a model from transformers itself: its causal-LM class built on the meta device.

``meta_parts(config)`` builds ``AutoModelForCausalLM.from_config(config)`` under
``torch.device("meta")`` (no weights, no memory, no download) and groups its
``named_parameters()`` and buffers into the planner's parts by module path:

1. The decoder layers are the ``nn.ModuleList`` whose length is the text config's
   ``num_hidden_layers`` (the one holding the most parameters when several qualify).
2. Inside a layer, the routed experts are the module named ``*experts*`` (not shared)
   that is either an ``nn.ModuleList`` of expert MLPs or holds fused tensors whose
   leading dimension is the number of experts; fused tensors are sliced along it, one
   part per expert. The experts' parent is the MoE block: everything else in it (router,
   shared experts) is the layer's ``moe`` part. In a dense layer the MLP child (``mlp``,
   ``feed_forward``, ...) is the ``mlp`` part. The rest of the layer (attention, norms,
   mixers) is the ``attn`` part.
3. Outside the layers, what is registered before the layer list is ``embed``, what comes
   after is ``head``; modules with buffers but no parameters (rotary embeddings) go with
   ``embed``, where they are computed; a tied output projection (``lm_head`` sharing the
   embedding matrix) is named in ``embed`` so it runs where its one weight lives.

Tied weights are counted once (``named_parameters`` deduplicates them). Part modules are
the largest module paths holding only that part's tensors, so the names handed to a
``device_map`` exist by construction. Projection weights (``nn.Linear`` and fused expert
tensors inside decoder layers, routers excepted) are marked quantizable; modules listed
in the model's ``_keep_in_fp32_modules`` keep 4-byte elements.

Descriptions are cached per config (building DeepSeek-V3 takes ~0.1 s, a binary search
over context lengths asks dozens of times).
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any

from memwarden.models._parts import Part, Tensor

__all__ = ["meta_parts", "build_meta_model", "MLP_NAMES"]

MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "mlp_block", "ff", "residual_mlp",
             "shared_mlp", "channel_mixer", "feedforward")


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def build_meta_model(config):
    """The transformers causal-LM model for ``config`` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with _quiet_transformers(), torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise ValueError(f"model_type {config.model_type!r} has no causal-LM class in transformers "
                                 "(it is not a text-generation model)") from None
            raise ValueError(f"transformers could not build model_type {config.model_type!r} from this "
                             f"config: {e}") from None
        except Exception as e:  # a config the model class cannot be built from
            raise ValueError(f"transformers could not build model_type {config.model_type!r} from this "
                             f"config: {type(e).__name__}: {e}") from None


def _decoder_layers(model, num_layers: int):
    """The ModuleList of decoder layers: of the config's length, else (a layer holding
    several attention sub-layers) of the model's no-split class; the largest wins."""
    from torch import nn

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        exact = len(module) == num_layers
        blocks = type(module[0]).__name__ in no_split
        if not (exact or blocks):
            continue
        rank = (exact, sum(p.numel() for p in module.parameters()))
        if best is None or rank > best[2]:
            best = (name, module, rank)
    if best is None:
        raise ValueError(f"cannot find the {num_layers} decoder layers of {type(model).__name__} "
                         "(no nn.ModuleList of that length)")
    return best[0], best[1]


def _find_experts(layer):
    """(relative path, module, number of experts, fused) of a layer's routed experts, or None."""
    from torch import nn

    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if "expert" not in leaf or "shared" in leaf:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return name, module, len(module), False
        count = getattr(module, "num_experts", None)
        leads = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() >= 2}
        if isinstance(count, int) and count > 0 and leads == {count}:
            return name, module, count, True
        if count is None and len(leads) == 1 and next(iter(leads)) > 1:
            return name, module, next(iter(leads)), True
    return None


def _dense_mlp(layer) -> str | None:
    for name, _ in layer.named_children():
        if name in MLP_NAMES:
            return name
    return None


def _is_linear(module) -> bool:
    from torch import nn
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 style transposed linear


_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_CACHE_SIZE = 64


def meta_parts(config) -> tuple:
    """Parts of ``config``'s model (templates shared between calls: price a copy)."""
    key = (config.model_type, config.to_json_string(use_diff=False))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    parts = _group(build_meta_model(config), config)
    _CACHE[key] = parts
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return parts


def _group(model, config) -> tuple:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ValueError(f"model_type {config.model_type!r}: its config has no num_hidden_layers, so its "
                         "decoder layers cannot be told apart")
    layers_path, layers = _decoder_layers(model, num_layers)
    fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())

    tensors: dict[str, list] = {}    # part name -> [Tensor]
    owner: dict[str, str] = {}       # tensor name -> part name
    meta: dict[str, tuple] = {}      # part name -> (kind, layer, expert)
    special_modules: dict[str, list] = {}  # part name -> module paths that are not found by purity

    def add(part: str, kind: str, layer: int, expert: int, tensor: Tensor) -> None:
        meta.setdefault(part, (kind, layer, expert))
        tensors.setdefault(part, []).append(tensor)
        owner[tensor.name.split("[")[0]] = part if expert < 0 else f"layers.{layer}.experts"

    def element_bytes(name: str, is_param: bool, value) -> float | None:
        if not is_param:
            return value.element_size()
        if any(f".{m}." in f".{name}" or name.startswith(f"{m}.") for m in fp32):
            return 4
        return None

    modules = dict(model.named_modules())
    seen: set = set()   # a block shared by several layers (Zamba) is counted where it first appears
    # 1. decoder layers
    prefix = layers_path + "."
    for i, layer in enumerate(layers):
        base = f"{prefix}{i}"
        found = _find_experts(layer)
        mlp_child = None if found else _dense_mlp(layer)
        block = found[0].rsplit(".", 1)[0] if found and "." in found[0] else ("" if found else None)
        router_rows = found[2] if found else None
        for kind_is_param, named in ((True, layer.named_parameters()), (False, layer.named_buffers())):
            for rel, value in named:
                if id(value) in seen:
                    continue
                seen.add(id(value))
                full = f"{base}.{rel}"
                mod_rel = rel.rsplit(".", 1)[0] if "." in rel else ""
                owner_mod = layer.get_submodule(mod_rel) if mod_rel else layer
                eb = element_bytes(full, kind_is_param, value)
                shape = tuple(value.shape)
                if found and (rel.startswith(found[0] + ".")):
                    ex_path, ex_mod, count, fused = found
                    inner = rel[len(ex_path) + 1:]
                    if fused and "." not in inner and shape and shape[0] == count:
                        for e in range(count):
                            add(f"layers.{i}.experts.{e}", "expert", i, e,
                                Tensor(f"{full}[{e}]", shape[1:], kind_is_param and len(shape) >= 3, eb,
                                       is_param=kind_is_param))
                        continue
                    if not fused:
                        e = int(inner.split(".", 1)[0])
                        add(f"layers.{i}.experts.{e}", "expert", i, e,
                            Tensor(full, shape, kind_is_param and _is_linear(owner_mod) and len(shape) == 2, eb,
                                   is_param=kind_is_param))
                        continue
                    add(f"layers.{i}.moe", "moe", i, -1, Tensor(full, shape, False, eb, is_param=kind_is_param))
                    continue
                in_block = found is not None and (block == "" or rel.startswith(block + "."))
                in_mlp = mlp_child is not None and rel.startswith(mlp_child + ".")
                quant = (kind_is_param and _is_linear(owner_mod) and len(shape) == 2
                         and not (in_block and shape[0] == router_rows))
                tensor = Tensor(full, shape, quant, eb, is_param=kind_is_param)
                if in_block and block != "":
                    add(f"layers.{i}.moe", "moe", i, -1, tensor)
                elif found is not None and mod_rel.split(".")[0] in MLP_NAMES:
                    add(f"layers.{i}.moe", "moe", i, -1, tensor)
                elif in_mlp:
                    add(f"layers.{i}.mlp", "mlp", i, -1, tensor)
                else:
                    add(f"layers.{i}.attn", "attn", i, -1, tensor)
        meta.setdefault(f"layers.{i}.attn", ("attn", i, -1))
        tensors.setdefault(f"layers.{i}.attn", [])
        if found:
            meta.setdefault(f"layers.{i}.moe", ("moe", i, -1))
            tensors.setdefault(f"layers.{i}.moe", [])
            ex_full = f"{base}.{found[0]}"
            for e in range(found[2]):
                special_modules[f"layers.{i}.experts.{e}"] = [ex_full if found[3] else f"{ex_full}.{e}"]

    # 2. outside the layers: before the layer list -> embed, after -> head
    order = {name: k for k, name in enumerate(modules)}
    layers_at = order[layers_path]
    layers_end = max(order[n] for n in modules if n == layers_path or n.startswith(prefix))
    param_modules = {n.rsplit(".", 1)[0] if "." in n else "" for n, _ in model.named_parameters()}
    for kind_is_param, named in ((True, model.named_parameters()), (False, model.named_buffers())):
        for full, value in named:
            if full.startswith(prefix) or id(value) in seen:
                continue
            mod = full.rsplit(".", 1)[0] if "." in full else ""
            after = order.get(mod, 0) > layers_end
            if not kind_is_param and mod not in param_modules:
                after = False  # rotary tables and the like are computed before the layers
            part = "head" if after else "embed"
            add(part, part, num_layers if after else -1, -1,
                Tensor(full, tuple(value.shape), False, element_bytes(full, kind_is_param, value),
                       is_param=kind_is_param))
    for part, layer in (("embed", -1), ("head", num_layers)):
        meta.setdefault(part, (part, layer, -1))
        tensors.setdefault(part, [])

    # tied weights: a module whose every parameter is an alias runs where the original lives
    first_name: dict[int, str] = {}
    aliased: dict[str, set] = {}
    own: dict[str, int] = {}
    for full, value in model.named_parameters(remove_duplicate=False):
        mod = full.rsplit(".", 1)[0] if "." in full else ""
        if id(value) in first_name and first_name[id(value)] != full:
            aliased.setdefault(mod, set()).add(owner.get(first_name[id(value)]))
        else:
            first_name[id(value)] = full
            own[mod] = own.get(mod, 0) + 1
    for mod, parts in aliased.items():
        if own.get(mod, 0) == 0 and len(parts) == 1 and None not in parts and not mod.startswith(prefix):
            special_modules.setdefault(next(iter(parts)), []).append(mod)

    # module purity: the largest module paths all of whose tensors belong to one part
    members: dict[str, set] = {}
    for name, part in owner.items():
        path = name
        while "." in path:
            path = path.rsplit(".", 1)[0]
            members.setdefault(path, set()).add(part)
        members.setdefault("", set()).add(part)

    def pure_modules(part: str, names: list) -> list:
        out = []
        for name in names:
            path, best = name, name
            while "." in path:
                parent = path.rsplit(".", 1)[0]
                if members.get(parent) != {part}:
                    break
                best = path = parent
            if best not in out:
                out.append(best)
        return out

    ordered = ["embed"]
    for i in range(len(layers)):
        ordered += [f"layers.{i}.attn"]
        if f"layers.{i}.mlp" in meta:
            ordered.append(f"layers.{i}.mlp")
        if f"layers.{i}.moe" in meta:
            ordered.append(f"layers.{i}.moe")
            ordered += sorted((p for p in meta if p.startswith(f"layers.{i}.experts.")),
                              key=lambda p: int(p.rsplit(".", 1)[1]))
    ordered.append("head")
    parts = []
    for name in ordered:
        kind, layer, expert = meta[name]
        ts = tuple(tensors[name])
        if kind == "expert":
            mods = tuple(special_modules[name])
        else:
            mods = tuple(pure_modules(name, [t.name for t in ts]) + special_modules.get(name, []))
        parts.append(Part(name, kind, layer, expert, mods, ts))
    return tuple(parts)
