"""Apply a Plan to a loaded transformers model: split fused experts across devices.

transformers 5 keeps a MoE layer's experts as fused 3-D parameters (``gate_up_proj
[E, 2I, H]``, ``down_proj [E, H, I]``; gpt-oss transposed, with biases). ``apply``
replaces each planned MoE layer's experts module with ``SplitExperts``: one shard per
device, each a copy of the original module (same class, so the same math and the same
``experts_implementation``) holding only that device's experts. A token's hidden state
goes to every device that holds one of its chosen experts, and the weighted outputs come
back and are summed on the token's device. Inside a shard, a token's positions whose
expert lives elsewhere point at one of its local experts with weight 0, so the original
forward needs no change (the product is exactly 0 for finite outputs).

Dense modules are moved to their planned devices, with a pre-hook that moves a module's
tensor inputs to its device (what accelerate's hooks do for a device_map).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from memwarden._devices import torch_device

__all__ = ["SplitExperts", "apply"]


def _torch_device(key: Any, devices: Mapping | None) -> torch.device:
    if devices is not None:
        if key not in devices:
            raise ValueError(f"devices: no torch device given for planned device {key!r} (got {list(devices)})")
        return torch.device(devices[key])
    if key == "disk":
        raise ValueError(f"apply: planned device {key!r} cannot hold tensors; map it with devices={{...}}")
    return torch_device(key, "planned device")


class SplitExperts(nn.Module):
    """A fused experts module whose experts live on several devices."""

    def __init__(self, experts: nn.Module, groups: list):
        super().__init__()
        num = experts.num_experts
        owner = torch.full((num,), -1, dtype=torch.long)
        local = torch.zeros(num, dtype=torch.long)
        self.devices = []
        self.shards = nn.ModuleList()
        for g, (device, ids) in enumerate(groups):
            ids = sorted(ids)
            idx = torch.tensor(ids, dtype=torch.long)
            owner[idx] = g
            local[idx] = torch.arange(len(ids))
            self.shards.append(_shard(experts, idx, device))
            self.devices.append(device)
        if (owner < 0).any():
            raise ValueError(f"SplitExperts: experts {(owner < 0).nonzero().flatten().tolist()} have no device")
        self.num_experts = num
        self.register_buffer("owner", owner, persistent=False)
        self.register_buffer("local", local, persistent=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        home = hidden_states.device
        owner = self.owner.to(home)[top_k_index]          # [T, K] shard of each choice
        local = self.local.to(home)[top_k_index]          # [T, K] index within that shard
        for g, shard in enumerate(self.shards):
            mine = owner == g
            tok = mine.any(dim=-1).nonzero().flatten()
            if tok.numel() == 0:
                continue
            m = mine[tok]
            first = m.to(torch.int8).argmax(dim=-1, keepdim=True)     # a local choice of each token
            idx = torch.where(m, local[tok], local[tok].gather(1, first).expand_as(m))
            w = top_k_weights[tok]
            w = torch.where(m, w, torch.zeros_like(w))
            dev = self.devices[g]
            res = shard(hidden_states[tok].to(dev), idx.to(dev), w.to(dev))
            out.index_add_(0, tok, res.to(home, out.dtype))
        return out


def _shard(experts: nn.Module, idx: torch.Tensor, device: torch.device) -> nn.Module:
    shard = experts.__class__.__new__(experts.__class__)
    shard.__dict__ = experts.__dict__.copy()
    shard._parameters = {}
    shard._buffers = {}
    shard._modules = dict(experts._modules)
    num = experts.num_experts
    with torch.no_grad():
        for name, p in experts._parameters.items():
            if p is None:
                shard._parameters[name] = None
                continue
            data = p.data[idx.to(p.device)] if p.dim() >= 1 and p.shape[0] == num else p.data
            shard._parameters[name] = nn.Parameter(data.to(device).clone(), requires_grad=p.requires_grad)
        for name, b in experts._buffers.items():
            shard._buffers[name] = None if b is None else (b[idx.to(b.device)] if b.shape[:1] == (num,) else b).to(device)
    shard.num_experts = len(idx)
    return shard.to(device)


def _move_inputs_hook(device: torch.device):
    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    def hook(module, args, kwargs):
        return move(args), move(kwargs)

    return hook


def _move_tensor(model: nn.Module, path: str, device: torch.device) -> None:
    """Move the parameter or buffer a device_map names directly (a key that is no module)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if name in parent._parameters and parent._parameters[name] is not None:
        param = parent._parameters[name]
        parent._parameters[name] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
    elif name in parent._buffers and parent._buffers[name] is not None:
        parent._buffers[name] = parent._buffers[name].to(device)
    else:
        raise ValueError(f"apply: the plan names {path!r}, which is neither a module nor a tensor of the model")


def apply(model: nn.Module, plan, devices: Mapping | None = None) -> nn.Module:
    """Place ``model`` as ``plan`` says, splitting fused experts across devices.

    devices: planned device key -> torch device (default: GPU index ``k`` -> ``cuda:k``,
    ``"cpu"`` -> cpu). Map every key to ``"cpu"`` to run the split and dispatch on a
    machine without GPUs. Returns the model (modified in place).
    """
    if not plan.feasible:
        raise ValueError(f"apply: the plan is not feasible: {plan.message}")
    tdev = {k: _torch_device(k, devices) for k in plan.devices}
    dm = plan.to_device_map()
    experts_path = {p.layer: p.modules[0] for p in plan.parts if p.kind == "expert"}  # exact by construction
    split = {}
    for layer, devs in plan.expert_devices.items():
        groups: dict = {}  # one shard per planned device, even when two map to the same torch device
        for e, d in enumerate(devs):
            groups.setdefault(d, []).append(e)
        split[layer] = [(tdev[d], ids) for d, ids in groups.items()]
    # dense modules (and lone tensors such as a router's bias buffer) onto their devices,
    # with input-moving hooks when devices differ
    many = len(set(tdev.values())) > 1
    skip = set(experts_path.values())
    for path, key in dm.items():
        if path in skip:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            _move_tensor(model, path, tdev[key])
            continue
        module.to(tdev[key])
        if many:
            module.register_forward_pre_hook(_move_inputs_hook(tdev[key]), with_kwargs=True)
    for layer, groups in split.items():
        path = experts_path[layer]
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        experts = getattr(parent, name, None)
        if experts is None or not hasattr(experts, "num_experts"):
            raise ValueError(f"apply: layer {layer} has no fused experts module at {path}")
        if isinstance(experts, SplitExperts):
            raise ValueError(f"apply: layer {layer} is already split")
        setattr(parent, name, SplitExperts(experts, groups))
    return model
