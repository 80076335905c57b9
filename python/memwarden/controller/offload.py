"""Offload: moves a model's decoder layers between the compute device and host memory as
memory pressure rises and falls, with hysteresis (an upper threshold to offload, a lower
one to bring back), while the model keeps answering with identical outputs.

    offloader = AutomaticOffloader(model, device="cuda:0")
    action = offloader.step()          # between requests, or from a monitor callback
    action.kind, action.nbytes         # ('offload', 12582912)

Order: layers leave from the last one backwards and come back in reverse (the lowest
offloaded index first), so the offloaded layers are always a suffix of the layer list.
Every layer runs for every token, so none is used less than another; a suffix is chosen
because it keeps the prefetch below simple (the next offloaded layer is the next to run).

How an offloaded layer still runs: its parameters and buffers point at views of one flat
host buffer (:class:`WeightSlots`, each tensor at an aligned offset with its strides); a
forward pre-hook copies that buffer onto the compute device in one copy for the layer's
forward and a forward hook points them back at the host buffer, so the device copy is
freed and the output is bit-identical, only slower. On CUDA the host buffer is pinned
and, while one offloaded layer runs, the next offloaded one is copied on a side stream.

The CPU stand-in (``device="cpu"``, ``offload_device="cpu"``): the "device" is memwarden's
host allocator (``memwarden.alloc.use("cpu", memory_limit=...)``), whose pool is what the
limit and the pressure count. Host buffers are allocated by numpy, outside that pool,
so offloading really lowers ``memwarden.alloc.memory_allocated("cpu")`` by the layer's
bytes and a forward of an offloaded layer really borrows them back from the pool.

Failures (host memory short, a copy error, the device out of memory on restore) leave the
layer on its previous placement -- every copy is made before any tensor is repointed --
and are reported in the :class:`Action`.

May import: :mod:`memwarden.plan`, :mod:`memwarden.kv`, :mod:`memwarden.alloc` and the
bottom layers. Never :mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from memwarden import alloc
from memwarden._devices import torch_device
from memwarden._units import parse_bytes

__all__ = ["AutomaticOffloader", "Action", "Move", "WeightSlots", "find_decoder_layers", "restore_together"]


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` holding the most parameters (``model.model.layers`` in a
    transformers causal LM). By parameters, not length, so a mixture-of-experts model's
    per-layer expert lists (longer than the layer list, but inside it) never win."""
    best, best_numel = None, -1
    for module in model.modules():  # pre-order: on a tie the outer list comes first
        if isinstance(module, nn.ModuleList):
            numel = sum(p.numel() for p in module.parameters())
            if numel > best_numel:
                best, best_numel = module, numel
    if best is None or len(best) == 0:
        raise ValueError(f"model: no non-empty nn.ModuleList of layers in {type(model).__name__}; "
                         "pass units= a sequence of modules")
    return best


@dataclass(frozen=True)
class Move:
    """One unit moved: ``direction`` is ``"offload"`` or ``"restore"``."""

    unit: int
    name: str
    direction: str
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class Action:
    """What one :meth:`AutomaticOffloader.step` did.

    ``kind``: ``"offload"`` or ``"restore"``, the direction moved or tried, or ``"none"``
    (between the thresholds, or nothing left to move). ``estimated_pressure`` is ``pressure`` corrected by the bytes
    moved (equal to it when the budget is unknown); both are ``None`` for
    :meth:`AutomaticOffloader.restore_all`, which reads no pressure. ``error`` says why a move failed; the
    units in ``moves`` were moved before it, the failed one was left as it was.
    """

    kind: str
    pressure: float | None
    estimated_pressure: float | None
    moves: tuple[Move, ...] = ()
    error: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(move.nbytes for move in self.moves)

    @property
    def units(self) -> tuple[int, ...]:
        return tuple(move.unit for move in self.moves)


def _threshold(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_pressure(pressure: Any) -> float:
    if isinstance(pressure, bool) or not isinstance(pressure, (int, float)) or not math.isfinite(pressure) \
            or pressure < 0:
        raise ValueError(f"pressure must be a finite number >= 0, got {pressure!r}")
    return float(pressure)


def _storage_span(tensor: torch.Tensor) -> int:
    """Elements a tensor's strides reach, so copies keep its strides (and its kernels' numerics)."""
    if tensor.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))


_ALIGNMENT = 64  # bytes: each tensor in a flat buffer starts on a cache line (a multiple of any dtype's size)


@dataclass(frozen=True)
class _Place:
    """Where one tensor sits in a flat byte buffer, and how to view it there."""

    offset: int
    nbytes: int  # the bytes its strides reach
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]

    def view_of(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset:self.offset + self.nbytes].view(self.dtype).as_strided(self.shape, self.stride)


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGNMENT) * _ALIGNMENT


def _layout(tensors: Sequence[torch.Tensor]) -> tuple[list[_Place], int]:
    """Each tensor's place in one flat buffer, and the buffer's bytes."""
    places, end = [], 0
    for tensor in tensors:
        offset = _aligned(end)
        nbytes = _storage_span(tensor) * tensor.element_size()
        places.append(_Place(offset, nbytes, tensor.dtype, tensor.shape, tensor.stride()))
        end = offset + nbytes
    return places, end


def _host_buffer(nbytes: int, *, pinned: bool, outside_pool: bool) -> torch.Tensor:
    """``nbytes`` of host memory. ``outside_pool``: numpy's, which memwarden's host allocator
    does not serve (the CPU stand-in for leaving the device)."""
    if outside_pool:
        return torch.from_numpy(np.empty(nbytes, dtype=np.uint8))
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def _copy_in(destination: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy the bytes ``tensor``'s strides reach into ``destination``: gaps included, so it is
    one contiguous copy even for a transposed or sliced tensor."""
    destination.copy_(tensor.detach().as_strided((_storage_span(tensor),), (1,)).view(torch.uint8))


def _device_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _device_copy(buffer: torch.Tensor, device: torch.device, *, non_blocking: bool) -> torch.Tensor:
    return _device_buffer(buffer.numel(), device).copy_(buffer, non_blocking=non_blocking)


@dataclass
class _Slot:
    """Where a module's tensor lives: ``owner._parameters[name]`` or ``owner._buffers[name]``."""

    owner: nn.Module
    name: str
    is_parameter: bool

    def get(self) -> torch.Tensor:
        return (self.owner._parameters if self.is_parameter else self.owner._buffers)[self.name]

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.owner._parameters[self.name].data = tensor  # same Parameter object: optimizers, ties
        else:
            self.owner._buffers[self.name] = tensor


class WeightSlots:
    """``module``'s parameters and buffers, each tensor once (tied weights are one slot, so
    they stay tied), which can be parked in one flat host buffer and brought back.

    :meth:`park` copies every tensor into one host byte buffer, each at a 64-byte aligned
    offset with its strides, and only then points the slots at views of it (a failed copy
    leaves them as they were). :meth:`restore` brings the whole buffer onto a device in one
    copy and points the slots there; :meth:`device_copy` and :meth:`point_at` are its two
    halves, for a copy that is used only for a while (the offloader's forward of an
    offloaded layer). ``exclude``: submodules whose tensors are left out (a model's decoder
    layers, parked as pieces of their own)."""

    def __init__(self, module: nn.Module, exclude: Sequence[nn.Module] = ()):
        self.slots: list[_Slot] = []
        seen: set[int] = set()
        left_out = {id(m) for part in exclude for m in part.modules()}
        for owner in module.modules():
            if id(owner) in left_out:
                continue
            for is_parameter, tensors in ((True, owner._parameters), (False, owner._buffers)):
                for name, tensor in tensors.items():
                    if tensor is not None and id(tensor) not in seen:  # a tied tensor is one slot
                        seen.add(id(tensor))
                        self.slots.append(_Slot(owner, name, is_parameter))
        self.host: torch.Tensor | None = None  # the flat host buffer while parked
        self._places: list[_Place] = []

    @property
    def nbytes(self) -> int:
        """The tensors' bytes (exact on the meta device too); the flat buffer adds the gaps of
        strided tensors and under 64 bytes of alignment each."""
        return sum(slot.get().numel() * slot.get().element_size() for slot in self.slots)

    @property
    def parked(self) -> bool:
        return self.host is not None

    def park(self, *, pinned: bool = False, outside_pool: bool = False) -> None:
        """Move the tensors into one flat host buffer: ``pinned``, or in numpy's memory when
        ``outside_pool`` (outside memwarden's host allocator: the CPU stand-in's host)."""
        tensors = [slot.get() for slot in self.slots]
        places, nbytes = _layout(tensors)
        host = _host_buffer(nbytes, pinned=pinned, outside_pool=outside_pool)
        for place, tensor in zip(places, tensors):
            _copy_in(host[place.offset:place.offset + place.nbytes], tensor)
        self.host, self._places = host, places
        self.point_at(host)

    def device_copy(self, device: torch.device, *, non_blocking: bool = False) -> torch.Tensor:
        """The parked buffer copied onto ``device`` in one copy; the slots stay parked."""
        return _device_copy(self.host, device, non_blocking=non_blocking)

    def point_at(self, buffer: torch.Tensor) -> None:
        """Point every slot at its view of ``buffer`` (the host buffer or a device copy)."""
        for slot, place in zip(self.slots, self._places):
            slot.set(place.view_of(buffer))

    def restore(self, device: torch.device, into: torch.Tensor | None = None) -> None:
        """Bring the parked tensors onto ``device`` (one blocking copy, so a failure raises
        here and leaves them parked) and let the host buffer go. ``into``: a byte tensor of
        the host buffer's size there to copy into (see :func:`restore_together`), instead
        of a new one."""
        if into is None:
            into = self.device_copy(device)
        else:
            into.copy_(self.host)
        self.point_at(into)
        self.host = None

    def holds_the_same_tensors_as(self, other: "WeightSlots") -> bool:
        return [(id(a.owner), a.name) for a in self.slots] == [(id(b.owner), b.name) for b in other.slots]


def restore_together(pieces: Sequence[WeightSlots], device: torch.device) -> None:
    """Restore parked ``pieces`` into one device allocation, a copy each: a caching
    allocator rounds every large block up (PyTorch's to 2 MiB), which a model's decoder
    layers restored one by one would pay once each. Out of memory leaves them all parked."""
    offsets, end = [], 0
    for piece in pieces:
        offsets.append(_aligned(end))
        end = offsets[-1] + piece.host.numel()
    buffer = _device_buffer(end, device)
    for piece, offset in zip(pieces, offsets):
        piece.restore(device, into=buffer[offset:offset + piece.host.numel()])


class _Unit:
    def __init__(self, index: int, name: str, module: nn.Module):
        self.index, self.name, self.module = index, name, module
        self.weights = WeightSlots(module)
        self.nbytes = self.weights.nbytes
        self.offloaded_since = 0.0
        self.hooks: list[Any] = []
        self.prefetched: tuple[torch.Tensor, Any] | None = None  # (device copy of the host buffer, CUDA event)


class AutomaticOffloader:
    """Offloads ``model``'s decoder layers to ``offload_device`` when memory pressure reaches
    ``offload_threshold`` and brings them back once it falls below ``restore_threshold``.

    ``device``: where the model computes (its units must be there). ``offload_device``:
    host memory (``"cpu"``); with ``device="cpu"`` too, the CPU stand-in of the module
    docstring. ``units``: ``"layers"`` (:func:`find_decoder_layers`) or a sequence of
    modules of ``model`` in the order they run. ``pressure``: a callable returning the
    fraction of the memory budget in use; default ``memwarden.alloc.memory_allocated(device)
    / memwarden.alloc.get_memory_limit(device)``. ``memory_limit``: the bytes (or ``"16 GiB"``) pressure
    1.0 stands for, to estimate the pressure after each move; default the allocator's limit
    (read at each step). Without one, a step moves one unit. ``pin_memory``: pin the host
    buffers (default: when ``device`` is a GPU; the CPU stand-in's are numpy's).

    ``parked``: the :class:`WeightSlots` of the last ``len(parked)`` units, already parked in
    host memory (a model coming back from a :class:`~memwarden.serve.pool.ModelPool` with
    layers left there): those units start offloaded, without a copy.

    Thread-safe: forwards through ``model`` hold the offloader's lock (hooks on ``model``),
    so a step waits for the forward in flight: repointing a tensor a running forward reads
    would free its memory under it. For the same reason forwards of ``model`` run one at
    a time, and a step from inside one (an ``on_oom`` callback, say) moves nothing and
    says so. :meth:`close` restores everything and removes the hooks.
    """

    def __init__(self, model: nn.Module, *, device: Any, offload_device: Any = "cpu",
                 offload_threshold: float = 0.8, restore_threshold: float = 0.6,
                 units: str | Sequence[nn.Module] = "layers",
                 pressure: Callable[[], float] | None = None,
                 memory_limit: int | str | None = None, pin_memory: bool | None = None,
                 parked: Sequence[WeightSlots] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.device = torch_device(device, "device")
        self.offload_device = torch_device(offload_device, "offload_device")
        if self.offload_device.type != "cpu":
            raise ValueError(f"offload_device must be host memory ('cpu'), got {offload_device!r}")
        self.offload_threshold = _threshold(offload_threshold, "offload_threshold")
        self.restore_threshold = _threshold(restore_threshold, "restore_threshold")
        if not self.restore_threshold < self.offload_threshold:
            raise ValueError(f"restore_threshold ({restore_threshold!r}) must be below offload_threshold "
                             f"({offload_threshold!r}), or pressure between them would flap")
        if pressure is not None and not callable(pressure):
            raise ValueError(f"pressure must be a callable returning a fraction, got {pressure!r}")
        if memory_limit is not None:
            memory_limit = parse_bytes(memory_limit, "memory_limit")
            if memory_limit <= 0:
                raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
        self._pressure_source = pressure
        self._memory_limit = memory_limit
        on_gpu = self.device.type == "cuda"
        self.pin_memory = (on_gpu and torch.cuda.is_available()) if pin_memory is None else bool(pin_memory)
        self._outside_pool = self.device.type == "cpu"  # the CPU stand-in: host buffers leave the pool
        self._units = self._make_units(model, units, list(parked))
        self._side_stream = torch.cuda.Stream(self.device) if on_gpu and torch.cuda.is_available() else None
        self._lock = threading.RLock()
        self._in_forward = threading.local()  # .depth: this thread's forwards of model in flight
        self._model_hooks = [model.register_forward_pre_hook(self._enter_forward),
                             model.register_forward_hook(self._leave_forward, always_call=True)]
        self._offloaded = 0  # the last `_offloaded` units are offloaded
        self._counts = {"offload_count": 0, "restore_count": 0, "failed_moves": 0, "fetch_count": 0}
        self._bytes_moved = 0
        self._move_seconds = 0.0
        self._offloaded_seconds = 0.0
        for unit in self._units[len(self._units) - len(parked):] if parked else ():
            self._mark_offloaded(unit)

    def _make_units(self, model: nn.Module, units: Any, parked: list) -> list[_Unit]:
        if isinstance(units, str):
            if units != "layers":
                raise ValueError(f"units must be 'layers' or a sequence of modules, got {units!r}")
            modules = list(find_decoder_layers(model))
        else:
            modules = list(units)
            if not modules or not all(isinstance(m, nn.Module) for m in modules):
                raise ValueError("units must be 'layers' or a non-empty sequence of nn.Modules")
        names = {id(module): name for name, module in model.named_modules()}
        made = []
        for index, module in enumerate(modules):
            if id(module) not in names:
                raise ValueError(f"units[{index}] is not a submodule of model")
            made.append(_Unit(index, names[id(module)], module))
        if len(parked) > len(made):
            raise ValueError(f"parked: {len(parked)} parked units, but the model has {len(made)}")
        for unit, weights in zip(made[len(made) - len(parked):], parked):
            if not isinstance(weights, WeightSlots) or not weights.parked \
                    or not weights.holds_the_same_tensors_as(unit.weights):
                raise ValueError(f"parked: not the parked weights of {unit.name}")
            unit.weights = weights
        self._check_units(model, made)
        return made

    def _check_units(self, model: nn.Module, units: list[_Unit]) -> None:
        inside = {id(slot.get()) for unit in units for slot in unit.weights.slots}
        unit_ids = {id(unit.module) for unit in units}
        for unit in units:
            if unit.weights.parked:
                continue  # adopted in host memory
            for slot in unit.weights.slots:
                if slot.get().device != self.device:
                    raise ValueError(f"device is {self.device}, but {unit.name}.{slot.name} is on "
                                     f"{slot.get().device}: move the model there first")
        # A tensor shared with a module outside the units would follow a unit to the host.
        for name, module in model.named_modules():
            if id(module) in unit_ids or any(name.startswith(u.name + ".") for u in units):
                continue
            for tensor in [*module._parameters.values(), *module._buffers.values()]:
                if tensor is not None and id(tensor) in inside:
                    raise ValueError(f"units share a tensor with {name or type(model).__name__}, "
                                     "which is not offloaded: offloading would move it too")

    # ---- state ----------------------------------------------------------------------------

    @property
    def units(self) -> tuple[str, ...]:
        """The units' qualified names, in execution order."""
        return tuple(unit.name for unit in self._units)

    @property
    def offloaded(self) -> tuple[int, ...]:
        """Indices of the offloaded units (always a suffix)."""
        with self._lock:
            return tuple(range(len(self._units) - self._offloaded, len(self._units)))

    @property
    def offloaded_bytes(self) -> int:
        with self._lock:
            return sum(self._units[i].nbytes for i in self.offloaded)

    def unit_bytes(self, index: int) -> int:
        return self._units[index].nbytes

    def stats(self) -> dict[str, Any]:
        """Counters: moves each way, failed moves, forwards that fetched an offloaded unit,
        bytes and seconds spent moving, achieved GB/s, and unit-seconds spent offloaded."""
        with self._lock:
            now = time.perf_counter()
            ongoing = sum(now - self._units[i].offloaded_since for i in self.offloaded)
            return {**self._counts,
                    "bytes_moved": self._bytes_moved,
                    "move_seconds": self._move_seconds,
                    "gb_per_s": self._bytes_moved / self._move_seconds / 1e9 if self._move_seconds else 0.0,
                    "offloaded_seconds": self._offloaded_seconds + ongoing,
                    "offloaded_units": self._offloaded,
                    "offloaded_bytes": self.offloaded_bytes}

    # ---- decisions ------------------------------------------------------------------------

    def current_pressure(self) -> float:
        """The injected ``pressure()``, else the allocator's allocated bytes over its limit."""
        if self._pressure_source is not None:
            return _check_pressure(self._pressure_source())
        limit = alloc.get_memory_limit(self.device)
        if limit is None:
            raise RuntimeError(f"no memory limit is set for {self.device}: pass pressure= or set one "
                               "with memwarden.alloc.set_memory_limit")
        return alloc.memory_allocated(self.device) / limit

    def _budget(self) -> int | None:
        if self._memory_limit is not None:
            return self._memory_limit
        return alloc.get_memory_limit(self.device)

    def step(self, pressure: float | None = None) -> Action:
        """Offload at ``pressure >= offload_threshold``, restore below ``restore_threshold``,
        else nothing (hysteresis). ``pressure``: default :meth:`current_pressure`.

        Offloading moves units (last first) until the estimated pressure falls below
        ``offload_threshold``. Restoring brings units back (lowest offloaded first) while
        the estimate after the move stays below ``offload_threshold``, so an unchanged load
        never offloads them again at the next step. Without a budget to estimate with,
        one unit moves per step.
        """
        pressure = self.current_pressure() if pressure is None else _check_pressure(pressure)
        if getattr(self._in_forward, "depth", 0):
            return Action("none", pressure, pressure, (), "step called during a forward of the model: "
                          "moving now would free tensors that forward is reading")
        with self._lock:
            self._drop_prefetches()  # between requests: a stale prefetch only holds memory
            budget = self._budget()
            estimate = pressure
            moves: list[Move] = []
            error = None
            if pressure >= self.offload_threshold:
                kind = "offload"
                while self._offloaded < len(self._units) and estimate >= self.offload_threshold:
                    unit = self._units[len(self._units) - 1 - self._offloaded]
                    move, error = self._offload(unit)
                    if error:
                        break
                    moves.append(move)
                    if budget is None:
                        break
                    estimate -= unit.nbytes / budget
            elif pressure < self.restore_threshold:
                kind = "restore"
                while self._offloaded > 0:
                    unit = self._units[len(self._units) - self._offloaded]
                    after = estimate + unit.nbytes / budget if budget else estimate
                    if after >= self.offload_threshold:
                        break
                    move, error = self._restore(unit)
                    if error:
                        break
                    moves.append(move)
                    estimate = after
                    if budget is None:
                        break
            else:
                kind = "none"
            if not moves and error is None:
                kind = "none"
            return Action(kind, pressure, estimate, tuple(moves), error)

    def restore_all(self) -> Action:
        """Bring every unit back (say before unloading the model)."""
        if getattr(self._in_forward, "depth", 0):
            return Action("none", None, None, (), "restore_all called during a forward of the model")
        with self._lock:
            self._drop_prefetches()
            moves, error = [], None
            while self._offloaded > 0 and error is None:
                move, error = self._restore(self._units[len(self._units) - self._offloaded])
                if move:
                    moves.append(move)
            return Action("restore" if moves else "none", None, None, tuple(moves), error)

    def close(self) -> Action:
        """Restore every unit and remove the hooks on ``model``; returns the restore's Action."""
        action = self.restore_all()
        if self._offloaded == 0:  # a failed restore keeps the hooks an offloaded unit needs
            for hook in self._model_hooks:
                hook.remove()
            self._model_hooks = []
        return action

    def detach(self) -> list[WeightSlots]:
        """Remove every hook, leaving the offloaded units' tensors parked in host memory, and
        return their :class:`WeightSlots` (execution order): for parking the rest of the
        model beside them. The model runs only once they are restored; the offloader is
        done."""
        if getattr(self._in_forward, "depth", 0):
            raise RuntimeError("detach called during a forward of the model")
        with self._lock:
            self._drop_prefetches()
            parked = [unit.weights for unit in self._units if unit.weights.parked]
            for unit in self._units:
                for hook in unit.hooks:
                    hook.remove()
                unit.hooks = []
            for hook in self._model_hooks:
                hook.remove()
            self._model_hooks = []
            self._offloaded = 0
            return parked

    # ---- moves ----------------------------------------------------------------------------

    def _offload(self, unit: _Unit) -> tuple[Move | None, str | None]:
        started = time.perf_counter()
        try:  # park copies everything before it repoints: a failure leaves the unit where it was
            unit.weights.park(pinned=self.pin_memory, outside_pool=self._outside_pool)
        except Exception as exc:  # MemoryError, a copy error, anything: report and keep serving
            self._counts["failed_moves"] += 1
            return None, f"offloading {unit.name}: {type(exc).__name__}: {exc}"
        self._mark_offloaded(unit)
        return self._record(unit, "offload", unit.offloaded_since - started), None

    def _mark_offloaded(self, unit: _Unit) -> None:
        """Hook up a unit whose weights are parked, so its forwards fetch them."""
        unit.hooks = [unit.module.register_forward_pre_hook(lambda *_: self._fetch(unit)),
                      unit.module.register_forward_hook(lambda *_: self._release(unit), always_call=True)]
        unit.offloaded_since = time.perf_counter()
        self._offloaded += 1

    def _restore(self, unit: _Unit) -> tuple[Move | None, str | None]:
        started = time.perf_counter()
        try:
            unit.weights.restore(self.device)
        except Exception as exc:  # the device out of memory, most likely: stay offloaded
            self._counts["failed_moves"] += 1
            return None, f"restoring {unit.name}: {type(exc).__name__}: {exc}"
        for hook in unit.hooks:
            hook.remove()
        unit.hooks = []
        finished = time.perf_counter()
        self._offloaded_seconds += finished - unit.offloaded_since
        self._offloaded -= 1
        return self._record(unit, "restore", finished - started), None

    def _record(self, unit: _Unit, direction: str, seconds: float) -> Move:
        self._counts[f"{direction}_count"] += 1
        self._bytes_moved += unit.nbytes
        self._move_seconds += seconds
        return Move(unit.index, unit.name, direction, unit.nbytes, seconds)

    # ---- forwards ---------------------------------------------------------------------------

    def _enter_forward(self, *_: Any) -> None:
        self._lock.acquire()
        self._in_forward.depth = getattr(self._in_forward, "depth", 0) + 1

    def _leave_forward(self, *_: Any) -> None:
        self._in_forward.depth -= 1
        self._lock.release()

    def _fetch(self, unit: _Unit) -> None:
        """Forward pre-hook: the unit's tensors onto the compute device for this forward."""
        with self._lock:
            if not unit.weights.parked:  # restored since the forward started
                return
            if unit.prefetched is not None:
                copy, ready = unit.prefetched
                unit.prefetched = None
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(ready)
                copy.record_stream(stream)  # made on the side stream, used and freed on this one
            else:
                copy = unit.weights.device_copy(self.device, non_blocking=self.pin_memory)
            unit.weights.point_at(copy)
            self._counts["fetch_count"] += 1
            self._prefetch_after(unit)

    def _release(self, unit: _Unit) -> None:
        """Forward hook: point the unit back at its host buffer, freeing the device copy."""
        with self._lock:
            if unit.weights.parked:
                unit.weights.point_at(unit.weights.host)

    def _prefetch_after(self, unit: _Unit) -> None:
        # Offloaded units are a suffix, so the next unit to run is offloaded too.
        if self._side_stream is None or unit.index + 1 >= len(self._units):
            return
        following = self._units[unit.index + 1]
        if not following.weights.parked or following.prefetched is not None:
            return
        with torch.cuda.stream(self._side_stream):
            copy = following.weights.device_copy(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._side_stream)
        following.prefetched = (copy, ready)

    def _drop_prefetches(self) -> None:
        for unit in self._units:
            unit.prefetched = None
