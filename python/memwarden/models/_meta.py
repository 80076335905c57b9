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
from dataclasses import dataclass

from memwarden.models._parts import Part, Tensor

__all__ = ["meta_parts", "build_meta_model", "quiet_transformers", "MLP_NAMES"]

MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "mlp_block", "ff", "residual_mlp",
             "shared_mlp", "channel_mixer", "feedforward")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings about configs and weights silenced (a meta build has no weights)."""
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

    with quiet_transformers(), torch.device("meta"):
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


@dataclass(frozen=True)
class _Experts:
    path: str      # relative to the decoder layer, e.g. "mlp.experts"
    count: int
    fused: bool    # 3-D tensors [experts, out, in] rather than an nn.ModuleList of MLPs

    @property
    def block(self) -> str:
        """The MoE block holding the experts (router, shared experts); "" is the layer itself."""
        return self.path.rsplit(".", 1)[0] if "." in self.path else ""


def _find_experts(layer) -> _Experts | None:
    """A layer's routed experts, or None for a dense layer."""
    from torch import nn

    for name, module in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1].lower()
        if "expert" not in leaf or "shared" in leaf:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            return _Experts(name, len(module), False)
        count = getattr(module, "num_experts", None)
        leads = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() >= 2}
        if isinstance(count, int) and count > 0 and leads == {count}:
            return _Experts(name, count, True)
        if count is None and len(leads) == 1 and next(iter(leads)) > 1:
            return _Experts(name, next(iter(leads)), True)
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


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


class _Grouping:
    """Assigns every parameter and buffer of a meta model to a part (see the module doc)."""

    def __init__(self, model, num_layers: int):
        self.model = model
        self.num_layers = num_layers
        self.fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) + tuple(
            getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        self.tensors: dict[str, list] = {}    # part name -> [Tensor]
        self.kinds: dict[str, tuple] = {}     # part name -> (kind, layer, expert)
        self.owner: dict[str, str] = {}       # tensor name -> part (a layer's fused experts share one owner)
        self.extra_modules: dict[str, list] = {}  # part -> device_map keys not found by purity
        self.seen: set = set()                # a block shared by several layers (Zamba) counts once

    def add(self, part: str, kind: str, layer: int, expert: int, tensor: Tensor) -> None:
        self.kinds.setdefault(part, (kind, layer, expert))
        self.tensors.setdefault(part, []).append(tensor)
        self.owner[tensor.name.split("[")[0]] = part if expert < 0 else f"layers.{layer}.experts"

    def tensor(self, name: str, value, quantizable: bool, is_param: bool, shape=None) -> Tensor:
        if not is_param:
            element = value.element_size()          # buffers keep their dtype
        elif any(f".{m}." in f".{name}" or name.startswith(f"{m}.") for m in self.fp32):
            element = 4
        else:
            element = None
        return Tensor(name, tuple(value.shape) if shape is None else shape, quantizable, element,
                      is_param=is_param)

    def named_tensors(self, module):
        """(relative name, tensor, is_param) of parameters then buffers not seen before."""
        for is_param, named in ((True, module.named_parameters()), (False, module.named_buffers())):
            for rel, value in named:
                if id(value) not in self.seen:
                    self.seen.add(id(value))
                    yield rel, value, is_param

    def layer(self, i: int, base: str, layer) -> None:
        """Step 2: a decoder layer's attn, mlp or moe, and expert parts."""
        experts = _find_experts(layer)
        mlp_child = None if experts else _dense_mlp(layer)
        for rel, value, is_param in self.named_tensors(layer):
            full = f"{base}.{rel}"
            owner_module = layer.get_submodule(_parent(rel))
            linear = is_param and _is_linear(owner_module) and value.dim() == 2
            if experts and rel.startswith(experts.path + "."):
                self.expert_tensor(i, experts, rel[len(experts.path) + 1:], full, value, is_param, linear)
                continue
            in_block = experts is not None and (experts.block == "" or rel.startswith(experts.block + "."))
            router = in_block and value.shape[0] == experts.count
            tensor = self.tensor(full, value, linear and not router, is_param)
            if experts and ((in_block and experts.block) or _parent(rel).split(".")[0] in MLP_NAMES):
                self.add(f"layers.{i}.moe", "moe", i, -1, tensor)
            elif mlp_child is not None and rel.startswith(mlp_child + "."):
                self.add(f"layers.{i}.mlp", "mlp", i, -1, tensor)
            else:
                self.add(f"layers.{i}.attn", "attn", i, -1, tensor)
        self.kinds.setdefault(f"layers.{i}.attn", ("attn", i, -1))
        self.tensors.setdefault(f"layers.{i}.attn", [])
        if experts:
            self.kinds.setdefault(f"layers.{i}.moe", ("moe", i, -1))
            self.tensors.setdefault(f"layers.{i}.moe", [])
            path = f"{base}.{experts.path}"
            for e in range(experts.count):
                self.extra_modules[f"layers.{i}.experts.{e}"] = [path if experts.fused else f"{path}.{e}"]

    def expert_tensor(self, i: int, experts: _Experts, inner: str, full: str, value, is_param: bool,
                      linear: bool) -> None:
        if experts.fused and "." not in inner and value.dim() and value.shape[0] == experts.count:
            for e in range(experts.count):  # one slice per expert
                self.add(f"layers.{i}.experts.{e}", "expert", i, e,
                         self.tensor(f"{full}[{e}]", value, is_param and value.dim() >= 3, is_param,
                                     shape=tuple(value.shape[1:])))
        elif not experts.fused:
            e = int(inner.split(".", 1)[0])
            self.add(f"layers.{i}.experts.{e}", "expert", i, e, self.tensor(full, value, linear, is_param))
        else:  # a tensor of the experts module without an expert dimension
            self.add(f"layers.{i}.moe", "moe", i, -1, self.tensor(full, value, False, is_param))

    def outside(self, layers_path: str) -> None:
        """Step 3: what is registered before the layer list is embed, after it head."""
        modules = dict(self.model.named_modules())
        order = {name: k for k, name in enumerate(modules)}
        prefix = layers_path + "."
        layers_end = max(order[n] for n in modules if n == layers_path or n.startswith(prefix))
        param_modules = {_parent(n) for n, _ in self.model.named_parameters()}
        for full, value, is_param in self.named_tensors(self.model):
            module = _parent(full)
            # buffer-only modules (rotary tables) are computed before the layers
            after = order.get(module, 0) > layers_end and (is_param or module in param_modules)
            part = "head" if after else "embed"
            self.add(part, part, self.num_layers if after else -1, -1, self.tensor(full, value, False, is_param))
        for part, layer in (("embed", -1), ("head", self.num_layers)):
            self.kinds.setdefault(part, (part, layer, -1))
            self.tensors.setdefault(part, [])

    def tied_modules(self, layers_path: str) -> None:
        """A module whose every parameter is an alias (a tied lm_head) runs where the original lives."""
        first_name: dict[int, str] = {}
        aliased: dict[str, set] = {}
        own: dict[str, int] = {}
        for full, value in self.model.named_parameters(remove_duplicate=False):
            module = _parent(full)
            if id(value) in first_name and first_name[id(value)] != full:
                aliased.setdefault(module, set()).add(self.owner.get(first_name[id(value)]))
            else:
                first_name[id(value)] = full
                own[module] = own.get(module, 0) + 1
        for module, parts in aliased.items():
            if own.get(module, 0) == 0 and len(parts) == 1 and None not in parts \
                    and not module.startswith(layers_path + "."):
                self.extra_modules.setdefault(next(iter(parts)), []).append(module)

    def parts(self, num_layer_modules: int) -> tuple:
        """The parts in pipeline order; device_map keys are the largest pure module paths."""
        members: dict[str, set] = {}
        for name, part in self.owner.items():
            path = name
            while path:
                path = _parent(path)
                members.setdefault(path, set()).add(part)

        def pure_modules(part: str, names: list) -> list:
            out = []
            for name in names:
                best = name
                while best and members.get(_parent(best)) == {part}:
                    best = _parent(best)
                if best not in out:
                    out.append(best)
            return out

        ordered = ["embed"]
        for i in range(num_layer_modules):
            ordered += [f"layers.{i}.{kind}" for kind in ("attn", "mlp", "moe") if f"layers.{i}.{kind}" in self.kinds]
            ordered += sorted((p for p in self.kinds if p.startswith(f"layers.{i}.experts.")),
                              key=lambda p: int(p.rsplit(".", 1)[1]))
        ordered.append("head")
        parts = []
        for name in ordered:
            kind, layer, expert = self.kinds[name]
            tensors = tuple(self.tensors[name])
            if kind == "expert":
                modules = tuple(self.extra_modules[name])
            else:
                modules = tuple(pure_modules(name, [t.name for t in tensors]) + self.extra_modules.get(name, []))
            parts.append(Part(name, kind, layer, expert, modules, tensors))
        return tuple(parts)


def _group(model, config) -> tuple:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise ValueError(f"model_type {config.model_type!r}: its config has no num_hidden_layers, so its "
                         "decoder layers cannot be told apart")
    layers_path, layers = _decoder_layers(model, num_layers)  # step 1
    grouping = _Grouping(model, num_layers)
    for i, layer in enumerate(layers):
        grouping.layer(i, f"{layers_path}.{i}", layer)
    grouping.outside(layers_path)
    grouping.tied_modules(layers_path)
    return grouping.parts(len(layers))
