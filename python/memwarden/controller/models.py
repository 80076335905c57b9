"""Model lifecycle policies: which models fit, what to change so one does, and which to
swap in and out of a device budget. Pure bookkeeping and arithmetic: nothing is loaded
here; the caller loads, offloads and unloads, and reports it to the :class:`ModelRegistry`.

* :class:`ServedModel` -- what a model costs: weights, KV bytes per token at its context,
  fixed buffers, its decoder layers (to price offloading some to host memory), its tier.
  :meth:`ServedModel.from_estimate` takes the numbers from :func:`memwarden.estimate.estimate`
  (called lazily: describing a transformers model imports transformers).
* :class:`ModelRegistry` -- per-model state (``unloaded``/``loading``/``loaded``/
  ``offloaded``), load time, last use, use count, running requests and a decayed demand;
  :meth:`~ModelRegistry.record_measured` replaces a model's estimated footprint by what was
  measured at load. Thread-safe: one lock around every method; readers get frozen
  snapshots (:class:`ModelState`).
* :func:`can_load_model` -- a :class:`LoadVerdict`: feasible or not, the bottleneck and
  ranked :class:`Adjustment` s that would make room.
* :func:`should_swap_models` -- a :class:`SwapDecision` for pending requests of models
  that are not loaded. Beside it, with the same signature, the baselines it is measured
  against (:data:`SWAP_POLICIES`): :func:`ollama_swap_models` (keep-alive, then the first
  idle model by name, at most ``max_loaded``), :func:`lru_swap_models` and
  :func:`never_unload_swap_models`; they keep only one rule, never a busy model.

Footprint of a model on the device: ``weights + kv_bytes_per_token x context + buffers``
(buffers: activation peak and fixed buffers). With ``host_layers=N`` decoder layers in host
memory (accelerate's ``device_map`` offload, :mod:`memwarden.estimate`), their weights
move to the host but one layer's worth stays reserved on the device, where accelerate
streams each offloaded layer in to run it; their KV stays on the device.

Demand (popularity, recency and frequency in one number): each request adds 1 to a
model's demand, which halves every ``demand_half_life_s`` (default 300 s):
``demand(now) = sum over requests of 2 ** (-(now - t_request) / half_life)``. A model's
*score* is its demand per GiB of footprint: the requests a byte of device memory serves.

Eviction rules, shared by both policies (one definition, :func:`_eviction_blocker`): a
model is never evicted while it has running requests, when its tier is above the tier of
the model that needs the room, or within ``min_residency_s`` of being loaded (so two
models do not thrash). Eligible models are evicted lowest tier first, then lowest
priority, lowest score, least recently used, and by name (so the order is total and
decisions are deterministic).

May import: :mod:`memwarden.estimate`, :mod:`memwarden.plan`, :mod:`memwarden.footprint`,
:mod:`memwarden.models`, :mod:`memwarden.alloc`, :mod:`memwarden.quant` and the bottom
layers. Never :mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from memwarden import footprint as F
from memwarden._checks import integer
from memwarden._units import format_bytes, parse_bytes

__all__ = [
    "STATUSES", "BOTTLENECKS", "ADJUSTMENTS", "ServedModel", "ModelState", "ModelRegistry", "SystemState",
    "LoadRequirements", "Adjustment", "LoadVerdict", "SwapDecision", "can_load_model", "should_swap_models",
    "ollama_swap_models", "lru_swap_models", "never_unload_swap_models", "SWAP_POLICIES", "should_promote_model",
]

STATUSES = ("unloaded", "loading", "loaded", "offloaded")
BOTTLENECKS = ("weights", "kv", "buffers", "host_memory")
# least disruptive first: INT8 KV changes nothing the caller sees but a little precision;
# a shorter context refuses only the longest requests; host layers slow every token down;
# unloading takes another model away from its users.
ADJUSTMENTS = ("int8_kv", "shrink_context", "offload_layers", "unload_model")

GiB = 2**30
_INT8_KV = "int8_per_token_head"  # memwarden's dynamic INT8 pages
_ON_DEVICE = ("loading", "loaded")  # a loading model already holds (or reserves) its bytes


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return float(value)


def _head_bytes(kv_dtype: Any, head_dim: int) -> float:
    """Bytes one token takes in one KV head of ``head_dim`` elements in ``kv_dtype``, as
    :mod:`memwarden.footprint` lays it out (elements, per-head scales, int4 groups)."""
    fmt = F.kv_format(kv_dtype)
    per = head_dim * fmt.element_bytes + fmt.scale_bytes_per_head
    if fmt.group:
        per += math.ceil(head_dim / fmt.group) * fmt.group_bytes
    return per


@dataclass(frozen=True)
class ServedModel:
    """What serving one model costs on the device, and how important it is.

    ``kv_bytes_per_token``: KV bytes of one token over all layers in ``kv_dtype`` (heads of
    ``head_dim`` elements, to price other KV formats). ``context``: the tokens of KV the
    model is loaded for. ``buffers_bytes``: activation peak and fixed buffers.
    ``num_layers``/``layer_bytes``: decoder layers and the bytes of one (0: offloading is
    not priced). ``tier``: higher is more important; a model never makes room by evicting
    a higher tier. ``priority``: order among evictable models (default: ``tier``).
    ``quota_bytes``: the most device memory the model may take (``None``: no cap).
    ``min_residency_s``: how long a loaded model is safe from eviction.
    """

    name: str
    weights_bytes: int
    kv_bytes_per_token: int
    context: int
    buffers_bytes: int = 0
    tier: int = 0
    quota_bytes: int | None = None
    priority: int | None = None
    min_residency_s: float = 30.0
    num_layers: int = 0
    layer_bytes: int = 0
    kv_dtype: str = "bfloat16"
    head_dim: int = 128

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        for attr in ("weights_bytes", "buffers_bytes", "layer_bytes"):
            object.__setattr__(self, attr, parse_bytes(getattr(self, attr), attr))
        object.__setattr__(self, "kv_bytes_per_token", integer(self.kv_bytes_per_token, "kv_bytes_per_token",
                                                               minimum=0))
        object.__setattr__(self, "context", integer(self.context, "context"))
        object.__setattr__(self, "tier", integer(self.tier, "tier", minimum=-2**63))
        priority = self.tier if self.priority is None else self.priority
        object.__setattr__(self, "priority", integer(priority, "priority", minimum=-2**63))
        if self.quota_bytes is not None:
            object.__setattr__(self, "quota_bytes", parse_bytes(self.quota_bytes, "quota_bytes"))
        object.__setattr__(self, "min_residency_s", _seconds(self.min_residency_s, "min_residency_s"))
        object.__setattr__(self, "num_layers", integer(self.num_layers, "num_layers", minimum=0))
        object.__setattr__(self, "kv_dtype", F.kv_format(self.kv_dtype).name)
        object.__setattr__(self, "head_dim", integer(self.head_dim, "head_dim"))

    @classmethod
    def from_estimate(cls, name: str, model: Any, context: int, kv_dtype: Any = "auto", tier: int = 0, *,
                      dtype: Any = None, batch: int = 1, **options) -> "ServedModel":
        """The spec of ``model`` (a model id, config, GGUF path or description) served at
        ``context`` tokens x ``batch``, from :func:`memwarden.estimate.estimate`.

        KV per token is the full-attention rate of :func:`memwarden.footprint.kv_bytes_per_token`
        (sliding layers priced as if the context were inside their window, so a shorter
        context is never under-priced); recurrent state, activations and fixed buffers go
        into ``buffers_bytes``. ``layer_bytes`` is the mean decoder layer, rounded up.
        ``options``: the other :class:`ServedModel` fields (``quota_bytes``, ``priority``,
        ``min_residency_s``)."""
        from memwarden.estimate import estimate
        from memwarden.models import describe  # transformers loads here, for a transformers model

        desc = describe(model, dtype)
        est = estimate(desc, None, context, batch, kv_dtype=kv_dtype)
        spec = desc.spec
        per_token = math.ceil(F.kv_bytes_per_token(spec, est.kv_dtype, desc.dtype) * batch)
        kv_only = sum(F.kv_layer_bytes(spec, context, batch, est.kv_dtype, desc.dtype))
        state = est.kv_cache - kv_only
        decoder = sum(p.bytes for p in desc.parts if 0 <= p.layer < spec.num_layers)
        heads = [layer for layer in spec.layers if layer.has_kv and layer.kv_heads]
        head_dim = (round(sum((layer.k_dim + layer.v_dim) / 2 for layer in heads) / len(heads))
                    if heads else 128)
        return cls(name=name, weights_bytes=est.weights, kv_bytes_per_token=per_token, context=context,
                   buffers_bytes=state + est.activations + est.overhead, tier=tier,
                   num_layers=spec.num_layers, layer_bytes=-(-decoder // max(spec.num_layers, 1)),
                   kv_dtype=est.kv_dtype, head_dim=head_dim, **options)

    def kv_per_token(self, kv_dtype: Any = None) -> int:
        """KV bytes per token in ``kv_dtype`` (default: the spec's), scaled by the ratio of
        one head's bytes in each format (rounded up)."""
        if kv_dtype is None or F.kv_format(kv_dtype).name == self.kv_dtype:
            return self.kv_bytes_per_token
        ratio = _head_bytes(kv_dtype, self.head_dim) / _head_bytes(self.kv_dtype, self.head_dim)
        return math.ceil(self.kv_bytes_per_token * ratio)

    def footprint(self, context: int | None = None, kv_dtype: Any = None) -> int:
        """Device bytes: weights + KV at ``context`` (default: the spec's) + buffers."""
        context = self.context if context is None else integer(context, "context", minimum=0)
        return self.weights_bytes + self.kv_per_token(kv_dtype) * context + self.buffers_bytes


@dataclass(frozen=True)
class ModelState:
    """A snapshot of one registered model. ``footprint_bytes``: measured at load when
    recorded, else the spec's estimate. ``demand``: decayed requests at ``now`` (see the
    module doc)."""

    spec: ServedModel
    status: str
    loaded_at: float | None
    last_used: float | None
    use_count: int
    running: int
    measured_bytes: int | None
    demand: float
    now: float
    host_layers: int = 0

    @property
    def weights_footprint_bytes(self) -> int:
        """The whole model's device bytes, as if no layer were in host memory."""
        return self.spec.footprint() if self.measured_bytes is None else self.measured_bytes

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def footprint_bytes(self) -> int:
        """Device bytes: the whole footprint less the layers in host memory, plus room for
        the one streamed in to run."""
        return _with_host_layers(self.weights_footprint_bytes, self.spec, self.host_layers)

    @property
    def score(self) -> float:
        """Demand per GiB of footprint: what a byte of device memory serves here."""
        return self.demand * GiB / max(self.footprint_bytes, 1)


def _with_host_layers(footprint: int, spec: ServedModel, host_layers: int) -> int:
    return footprint - host_layers * spec.layer_bytes + (spec.layer_bytes if host_layers else 0)


class _Books:
    __slots__ = ("spec", "status", "loaded_at", "last_used", "use_count", "running", "measured", "demand",
                 "demand_at", "host_layers")

    def __init__(self, spec: ServedModel):
        self.spec = spec
        self.status = "unloaded"
        self.loaded_at = self.last_used = self.measured = None
        self.use_count = self.running = 0
        self.demand, self.demand_at = 0.0, 0.0
        self.host_layers = 0


class ModelRegistry:
    """The registered models and their lifecycle state, by name.

    Transitions: ``unloaded``/``offloaded`` -> ``loading`` -> ``loaded`` <-> ``offloaded``
    (weights parked in host memory and back); any state -> ``unloaded`` once no request
    runs. Residency (``loaded_at``) counts from the latest move to ``loaded``. Requests run only on a loaded model
    (:meth:`begin_request` / :meth:`end_request`). ``clock`` (monotonic seconds) is
    injectable for tests.
    """

    _FROM = {"loading": ("unloaded", "offloaded"), "loaded": ("loading", "offloaded"), "offloaded": ("loaded",),
             "unloaded": STATUSES}

    def __init__(self, clock: Callable[[], float] = time.monotonic, demand_half_life_s: float = 300.0):
        if not callable(clock):
            raise ValueError(f"clock must be callable, got {clock!r}")
        self._clock = clock
        self._half_life = _seconds(demand_half_life_s, "demand_half_life_s")
        if self._half_life == 0:
            raise ValueError("demand_half_life_s must be positive, got 0")
        self._models: dict[str, _Books] = {}
        self._lock = threading.Lock()

    def _get(self, name: str) -> _Books:
        try:
            return self._models[name]
        except KeyError:
            raise KeyError(f"model {name!r} is not registered") from None

    def _demand(self, books: _Books, now: float) -> float:
        return books.demand * 2 ** (-max(now - books.demand_at, 0.0) / self._half_life)

    def _snapshot(self, books: _Books, now: float) -> ModelState:
        return ModelState(spec=books.spec, status=books.status, loaded_at=books.loaded_at,
                          last_used=books.last_used, use_count=books.use_count, running=books.running,
                          measured_bytes=books.measured, demand=self._demand(books, now), now=now,
                          host_layers=books.host_layers)

    def register(self, spec: ServedModel) -> None:
        if not isinstance(spec, ServedModel):
            raise ValueError(f"spec must be a ServedModel, got {type(spec).__name__}")
        with self._lock:
            if spec.name in self._models:
                raise ValueError(f"model {spec.name!r} is already registered")
            self._models[spec.name] = _Books(spec)

    def unregister(self, name: str) -> None:
        """Forget an unloaded model (a loaded one must be unloaded first: its bytes are held)."""
        with self._lock:
            if self._get(name).status != "unloaded":
                raise ValueError(f"model {name!r} is {self._models[name].status}: unload it before unregistering")
            del self._models[name]

    def _move(self, name: str, status: str) -> None:
        with self._lock:
            books = self._get(name)
            if books.status not in self._FROM[status]:
                raise ValueError(f"model {name!r} cannot go from {books.status} to {status}")
            if status in ("unloaded", "offloaded") and books.running:
                raise ValueError(f"model {name!r} has {books.running} running request(s)")
            if status == "loaded":
                books.loaded_at = self._clock()
            elif status == "unloaded":
                books.loaded_at = None
            if status != "loaded":
                books.host_layers = 0
            books.status = status

    def mark_loading(self, name: str) -> None:
        self._move(name, "loading")

    def mark_loaded(self, name: str, measured_bytes: Any = None, host_layers: int = 0) -> None:
        """The model is resident; ``measured_bytes`` (what the whole model really took)
        replaces the estimate; ``host_layers`` of its decoder layers stayed in host memory."""
        if measured_bytes is not None:
            self.record_measured(name, measured_bytes)
        self._move(name, "loaded")
        self.set_host_layers(name, host_layers)

    def set_host_layers(self, name: str, host_layers: int) -> None:
        """A loaded model now has ``host_layers`` decoder layers in host memory (0: all back)."""
        with self._lock:
            books = self._get(name)
            host_layers = integer(host_layers, "host_layers", minimum=0, maximum=books.spec.num_layers)
            if host_layers and books.status != "loaded":
                raise ValueError(f"model {name!r} is {books.status}: only a loaded model keeps layers in host memory")
            books.host_layers = host_layers

    def mark_offloaded(self, name: str) -> None:
        self._move(name, "offloaded")

    def mark_unloaded(self, name: str) -> None:
        self._move(name, "unloaded")

    def record_measured(self, name: str, nbytes: Any) -> None:
        """Replace ``name``'s estimated footprint by ``nbytes`` measured at load."""
        nbytes = parse_bytes(nbytes, "nbytes")
        with self._lock:
            self._get(name).measured = nbytes

    def begin_request(self, name: str) -> None:
        with self._lock:
            books = self._get(name)
            if books.status != "loaded":
                raise ValueError(f"model {name!r} is {books.status}: requests run only on a loaded model")
            now = self._clock()
            books.demand, books.demand_at = self._demand(books, now) + 1.0, now
            books.running += 1
            books.use_count += 1
            books.last_used = now

    def end_request(self, name: str) -> None:
        with self._lock:
            books = self._get(name)
            if not books.running:
                raise ValueError(f"model {name!r} has no running request to end")
            books.running -= 1
            books.last_used = self._clock()

    def state(self, name: str, now: float | None = None) -> ModelState:
        with self._lock:
            return self._snapshot(self._get(name), self._clock() if now is None else now)

    def states(self, now: float | None = None) -> list[ModelState]:
        """Every model's snapshot at one instant, by name."""
        with self._lock:
            now = self._clock() if now is None else now
            return [self._snapshot(self._models[name], now) for name in sorted(self._models)]

    def system_state(self, free_device_bytes: Any, free_host_bytes: Any, now: float | None = None) -> "SystemState":
        return SystemState(free_device_bytes, free_host_bytes,
                           tuple(s for s in self.states(now) if s.status in _ON_DEVICE))


@dataclass(frozen=True)
class SystemState:
    """Free memory now, and the models on the device (snapshots from the registry)."""

    free_device_bytes: int
    free_host_bytes: int
    loaded: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "free_device_bytes", parse_bytes(self.free_device_bytes, "free_device_bytes"))
        object.__setattr__(self, "free_host_bytes", parse_bytes(self.free_host_bytes, "free_host_bytes"))
        object.__setattr__(self, "loaded", tuple(self.loaded))


@dataclass(frozen=True)
class LoadRequirements:
    """A model to load, at ``context`` (default: the spec's) in ``kv_dtype`` (default: the
    spec's), with ``host_layers`` decoder layers in host memory."""

    spec: ServedModel
    context: int | None = None
    kv_dtype: str | None = None
    host_layers: int = 0

    def __post_init__(self):
        if not isinstance(self.spec, ServedModel):
            raise ValueError(f"spec must be a ServedModel, got {type(self.spec).__name__}")
        object.__setattr__(self, "context", self.spec.context if self.context is None
                           else integer(self.context, "context"))
        object.__setattr__(self, "kv_dtype", F.kv_format(self.kv_dtype or self.spec.kv_dtype).name)
        integer(self.host_layers, "host_layers", minimum=0, maximum=self.spec.num_layers)

    def device_weights(self, host_layers: int | None = None) -> int:
        n = self.host_layers if host_layers is None else host_layers
        streamed = self.spec.layer_bytes if n else 0  # room for the layer accelerate streams in
        return self.spec.weights_bytes - n * self.spec.layer_bytes + streamed

    def kv_bytes(self, context: int | None = None, kv_dtype: str | None = None) -> int:
        return self.spec.kv_per_token(kv_dtype or self.kv_dtype) * (self.context if context is None else context)

    def device_bytes(self, host_layers: int | None = None) -> int:
        return self.device_weights(host_layers) + self.kv_bytes() + self.spec.buffers_bytes


@dataclass(frozen=True)
class Adjustment:
    """One change that makes room: ``kind`` (see :data:`ADJUSTMENTS`), a sentence,
    ``saves_bytes`` of device memory, ``sufficient`` when it alone makes the load fit, and
    ``value``: the new context, the layers in host memory, or the model to unload."""

    kind: str
    detail: str
    saves_bytes: int
    sufficient: bool
    value: Any = None


@dataclass(frozen=True)
class LoadVerdict:
    """``bottleneck``: the first part that does not fit -- ``weights`` alone, then with
    ``kv``, then with ``buffers`` -- or ``host_memory`` for the host layers; ``None`` when
    feasible."""

    feasible: bool
    bottleneck: str | None
    needed_device_bytes: int
    available_device_bytes: int
    needed_host_bytes: int
    suggested_adjustments: list = field(default_factory=list)


def _eviction_blocker(state: ModelState, for_tier: int, for_score: float | None = None) -> str | None:
    """Why ``state`` may not give way to a model of ``for_tier`` (and score), or ``None``."""
    if state.status != "loaded":
        return f"{state.name} is {state.status}"
    if state.running:
        return f"{state.name} has {state.running} running request(s)"
    if state.spec.tier > for_tier:
        return f"{state.name} is tier {state.spec.tier}, above {for_tier}"
    if state.now - state.loaded_at < state.spec.min_residency_s:
        return (f"{state.name} was loaded {state.now - state.loaded_at:g} s ago "
                f"(min residency {state.spec.min_residency_s:g} s)")
    if for_score is not None and state.spec.tier == for_tier and state.score >= for_score:
        return f"{state.name} is as much in demand per byte ({state.score:.3g}/GiB)"
    return None


def _eviction_order(state: ModelState) -> tuple:
    return (state.spec.tier, state.spec.priority, state.score, state.last_used or 0.0, state.name)


def can_load_model(system_state: SystemState, requirements: LoadRequirements | ServedModel) -> LoadVerdict:
    """Whether the model fits what is free, and if not, what would make it fit.

    The room on the device is ``free_device_bytes``, capped by the model's ``quota_bytes``.
    When it does not fit, ``suggested_adjustments`` lists, sufficient ones first, then by
    :data:`ADJUSTMENTS` order (least disruption), unload candidates in eviction order:

    * ``int8_kv`` -- KV in INT8 with per-token-head scales (when that is smaller);
    * ``shrink_context`` -- the largest context that fits (buffers included);
    * ``offload_layers`` -- the fewest decoder layers in host memory that fit, when the
      host has room for them (omitted when none suffice);
    * ``unload_model`` -- each idle loaded model that may give way (module doc), saving
      its footprint; sufficient when that room, within the quota, is enough.

    A ``host_memory`` bottleneck gets no suggestions: device changes do not free the host.
    """
    req = requirements if isinstance(requirements, LoadRequirements) else LoadRequirements(requirements)
    spec = req.spec
    quota = math.inf if spec.quota_bytes is None else spec.quota_bytes
    free = system_state.free_device_bytes
    room = min(free, quota)
    needed = req.device_bytes()
    host_needed = req.host_layers * spec.layer_bytes
    parts = [("weights", req.device_weights()), ("kv", req.kv_bytes()), ("buffers", spec.buffers_bytes)]
    bottleneck, total = None, 0
    for part, nbytes in parts:
        total += nbytes
        if total > room:
            bottleneck = part
            break
    if bottleneck is None and host_needed > system_state.free_host_bytes:
        bottleneck = "host_memory"
    adjustments = [] if bottleneck in (None, "host_memory") else _adjustments(system_state, req, room, quota)
    return LoadVerdict(feasible=bottleneck is None, bottleneck=bottleneck, needed_device_bytes=needed,
                       available_device_bytes=int(room), needed_host_bytes=host_needed,
                       suggested_adjustments=adjustments)


def _adjustments(system_state: SystemState, req: LoadRequirements, room: int, quota: float) -> list:
    spec = req.spec
    needed = req.device_bytes()
    short = needed - room
    found = []
    int8_saves = req.kv_bytes() - req.kv_bytes(kv_dtype=_INT8_KV)
    if int8_saves > 0:
        found.append(Adjustment("int8_kv", f"store KV as {_INT8_KV}: saves {format_bytes(int8_saves)}",
                                int8_saves, int8_saves >= short, _INT8_KV))
    per_token = spec.kv_per_token(req.kv_dtype)
    if per_token:
        context = (room - req.device_weights() - spec.buffers_bytes) // per_token
        if 1 <= context < req.context:
            saves = (req.context - context) * per_token
            found.append(Adjustment("shrink_context", f"shrink the context to {context} tokens: saves "
                                    f"{format_bytes(saves)}", saves, True, int(context)))
    if spec.layer_bytes:
        for layers in range(req.host_layers + 1, spec.num_layers + 1):
            if layers * spec.layer_bytes > system_state.free_host_bytes:
                break
            if req.device_bytes(layers) <= room:
                saves = needed - req.device_bytes(layers)
                found.append(Adjustment("offload_layers", f"put {layers} of {spec.num_layers} layers in host "
                                        f"memory: saves {format_bytes(saves)}", saves, True, layers))
                break
    victims = [s for s in system_state.loaded if s.name != spec.name and _eviction_blocker(s, spec.tier) is None]
    for state in sorted(victims, key=_eviction_order):
        saves = state.footprint_bytes
        enough = min(system_state.free_device_bytes + saves, quota) >= needed
        found.append(Adjustment("unload_model", f"unload {state.name} (tier {state.spec.tier}, idle): frees "
                                f"{format_bytes(saves)}", saves, enough, state.name))
    # sorted is stable: unload candidates keep their eviction order
    return sorted(found, key=lambda a: (not a.sufficient, ADJUSTMENTS.index(a.kind)))


@dataclass(frozen=True)
class SwapDecision:
    """Models to unload (``swap_out``) then load (``swap_in``), by name, and why.
    ``drain``: loaded models that would give way but for their running requests; the
    caller should start no new request on them, so the swap can happen as soon as those
    end instead of at the next gap in their traffic. ``host_layers``: models of
    ``swap_in`` to load with that many decoder layers left in host memory (streamed in
    to run) because the whole model does not fit beside the busier ones
    (:func:`should_swap_models` only)."""

    swap_out: list
    swap_in: list
    reason: str
    drain: list = field(default_factory=list)
    host_layers: dict = field(default_factory=dict)


def _pending_counts(pending_requests: Any) -> dict:
    items = pending_requests.items() if isinstance(pending_requests, Mapping) else pending_requests
    if not isinstance(items, Iterable) or isinstance(items, str):
        raise ValueError("pending_requests must be a mapping of name to count, or a list of names or "
                         f"(name, count) pairs, got {pending_requests!r}")
    counts: dict = {}
    for item in items:
        name, count = (item, 1) if isinstance(item, str) else item
        counts[name] = counts.get(name, 0) + integer(count, f"pending_requests[{name!r}]", minimum=0)
    return counts



def _swap_candidates(registry: ModelRegistry, pending_requests: Any, device_budget: Any,
                     now: float | None) -> tuple[int, list, list, dict]:
    """(budget, the models on the device, the pending models that are not, waiting
    requests by name) -- a pending model's snapshot carries its waiting requests in its
    demand."""
    budget = parse_bytes(device_budget, "device_budget")
    counts = _pending_counts(pending_requests)
    states = {s.name: s for s in registry.states(now)}
    unknown = sorted(n for n in counts if n not in states)
    if unknown:
        raise KeyError(f"pending model(s) not registered: {', '.join(map(repr, unknown))}")
    candidates = [replace(states[name], demand=states[name].demand + count) for name, count in counts.items()
                  if count and states[name].status in ("unloaded", "offloaded")]
    resident = [s for s in states.values() if s.status in _ON_DEVICE]
    return budget, resident, candidates, counts


def _busy(state: ModelState, _candidate: ModelState) -> str | None:
    """The baselines' only rule: a model that is loading or serving stays."""
    if state.status != "loaded":
        return f"{state.name} is {state.status}"
    if state.running:
        return f"{state.name} has {state.running} running request(s)"
    return None


def _give_way(resident: list, cand: ModelState, short: int, slots_short: int, blocker: Callable,
              spare: bool = False) -> tuple:
    """(the ``resident`` models, in order, that give way until ``short`` bytes and
    ``slots_short`` slots are freed for ``cand``; the reasons of those that may not).
    ``spare``: then keep, smallest first, each victim the others free enough without (a
    small idle model early in the eviction order would otherwise go for nothing)."""
    victims, blockers = [], []
    for state in resident:
        if short - sum(v.footprint_bytes for v in victims) <= 0 and len(victims) >= slots_short:
            break
        why = blocker(state, cand)
        (blockers if why else victims).append(why or state)
    if spare:
        for state in sorted(victims, key=lambda v: v.footprint_bytes):
            if sum(v.footprint_bytes for v in victims) - state.footprint_bytes >= short \
                    and len(victims) > slots_short:
                victims.remove(state)
    return victims, blockers


def _plan_swaps(budget: int, candidates: list, resident: list, blocker: Callable, order_words: str,
                max_loaded: int | None = None, swap_out: Iterable = (), drain_busy: bool = False,
                partial: bool = False, spare: bool = False) -> SwapDecision:
    """Take each candidate, in order, that fits ``budget`` once enough ``resident`` models
    (in eviction order) give way; ``blocker(state, candidate)`` says why one may not.
    ``max_loaded``: at most that many models on the device. ``swap_out``: models already
    chosen to go (kept-alive ones that expired); the caller removed them from ``resident``.
    ``drain_busy``: for the first candidate refused only because models serve requests,
    name those models in ``drain``. ``partial``: a refused candidate parked in host memory
    is taken with the fewest decoder layers left there that make it fit what is free --
    unless draining (``drain_busy``) would make room for it whole.
    ``spare``: see :func:`_give_way`."""
    resident = list(resident)
    swap_out, swap_in, refusals, drain, host_layers = list(swap_out), [], [], [], {}
    free = budget - sum(s.footprint_bytes for s in resident)
    for cand in candidates:
        short = cand.footprint_bytes - free
        slots_short = len(resident) + len(swap_in) + 1 - max_loaded if max_loaded else 0
        victims, blockers = _give_way(resident, cand, short, slots_short, blocker, spare)
        freed = sum(v.footprint_bytes for v in victims)
        if freed < short or len(victims) < slots_short:
            # running requests end soon: waiting for them beats streaming layers for a while
            to_drain = _to_drain(resident, cand, short, slots_short, blocker) if drain_busy else []
            layers = _layers_to_leave(cand, free) if partial and not to_drain else None
            if layers is not None:
                host_layers[cand.name] = layers
                swap_in.append(cand.name)
                free -= _with_host_layers(cand.weights_footprint_bytes, cand.spec, layers)
                continue
            why = "; ".join(blockers) or "nothing else is loaded"
            need = (f"needs {format_bytes(short)} more than is free (budget {format_bytes(budget)})" if freed < short
                    else f"needs one of {max_loaded} model slots")
            refusals.append(f"{cand.name} {need}: {why}")
            drain = drain or to_drain
            continue
        for victim in victims:
            resident.remove(victim)
        swap_out += [v.name for v in victims]
        swap_in.append(cand.name)
        free += freed - cand.footprint_bytes
    drain = [name for name in drain if name not in swap_out]
    drained = f"; draining {', '.join(drain)}" if drain else ""
    if not swap_in:
        reason = "nothing can be swapped in: " + " | ".join(refusals) if refusals else \
            "nothing to swap in: no pending request for a model that is not loaded"
        return SwapDecision(swap_out, [], reason + (f"; expired: {', '.join(swap_out)}" if swap_out else "")
                            + drained, drain)
    reason = "swap in " + ", ".join(f"{name} with {host_layers[name]} of {layers} layers in host memory"
                                    if name in host_layers else name
                                    for name, layers in ((n, _spec_layers(candidates, n)) for n in swap_in))
    if swap_out:
        reason += f", swap out {', '.join(swap_out)} ({order_words})"
    if refusals:
        reason += "; skipped: " + " | ".join(refusals)
    return SwapDecision(swap_out, swap_in, reason + drained, drain, host_layers)


def _spec_layers(candidates: list, name: str) -> int:
    return next(c.spec.num_layers for c in candidates if c.name == name)


def _layers_to_leave(cand: ModelState, free: int) -> int | None:
    """The fewest decoder layers of ``cand`` (parked in host memory) to leave there so the
    rest fits in ``free`` bytes; ``None`` when it cannot be placed so (not parked, layers
    not priced, or not even one layer's room to stream through)."""
    spec = cand.spec
    if cand.status != "offloaded" or not spec.layer_bytes or not spec.num_layers:
        return None
    whole = cand.weights_footprint_bytes
    for layers in range(1, spec.num_layers + 1):
        if _with_host_layers(whole, spec, layers) <= free:
            return layers
    return None


def _to_drain(resident: list, cand: ModelState, short: int, slots_short: int, blocker: Callable) -> list:
    """The busy models that would give way to ``cand`` were their requests over, when
    that alone would make room; else none (draining them would not be enough)."""
    idle = [replace(state, running=0) if state.status == "loaded" else state for state in resident]
    victims, _ = _give_way(idle, cand, short, slots_short, blocker, spare=True)
    if sum(v.footprint_bytes for v in victims) < short or len(victims) < slots_short:
        return []
    busy = {s.name for s in resident if s.running}
    return [v.name for v in victims if v.name in busy]


def should_swap_models(registry: ModelRegistry, pending_requests: Any, device_budget: Any,
                       now: float | None = None) -> SwapDecision:
    """Which pending models to load into ``device_budget`` bytes, and which loaded models to
    unload for them.

    ``pending_requests``: waiting requests of models not loaded -- ``{name: count}``, or a
    list of names (each one request) or of ``(name, count)``. A pending model's demand is
    its decayed demand plus its waiting requests. Candidates go highest tier first, then
    highest score, then by name; each is taken when it fits what is free (budget minus
    loaded and loading models' footprints, after earlier picks) once enough evictable
    models (module doc) give way. A model of the same tier gives way only when its score
    is below the candidate's, so a busier model per byte is never pushed out by a quieter
    one. A candidate that cannot be placed is skipped; the reason names the blockers.
    """
    budget, resident, candidates, _ = _swap_candidates(registry, pending_requests, device_budget, now)
    candidates.sort(key=lambda s: (-s.spec.tier, -s.score, s.name))
    return _plan_swaps(budget, candidates, sorted(resident, key=_eviction_order),
                       lambda state, cand: _eviction_blocker(state, cand.spec.tier, cand.score),
                       "lowest tier, then least demand per byte", drain_busy=True, partial=True, spare=True)


def should_promote_model(registry: ModelRegistry, name: str, device_budget: Any,
                         now: float | None = None) -> SwapDecision:
    """Whether loaded model ``name``, running with decoder layers in host memory, should
    bring them back: ``swap_in == [name]`` (with ``host_layers == {name: 0}``) when the
    budget has room for its whole footprint once the models in ``swap_out`` give way --
    idle ones that :func:`should_swap_models` would evict for it (lower tier, or less demand
    per byte of the same tier, past their minimum residency)."""
    budget = parse_bytes(device_budget, "device_budget")
    states = {s.name: s for s in registry.states(now)}
    if name not in states:
        raise KeyError(f"model {name!r} is not registered")
    state = states[name]
    if state.status != "loaded" or not state.host_layers:
        return SwapDecision([], [], f"{name} has no layers in host memory")
    others = sorted((s for s in states.values() if s.status in _ON_DEVICE and s.name != name), key=_eviction_order)
    short = state.weights_footprint_bytes - (budget - sum(s.footprint_bytes for s in others))
    victims, blockers = _give_way(others, state, short, 0, lambda s, c: _eviction_blocker(s, c.spec.tier, c.score),
                                  spare=True)
    if sum(v.footprint_bytes for v in victims) < short:
        return SwapDecision([], [], f"{name} keeps {state.host_layers} layers in host memory: "
                            + ("; ".join(blockers) or "no room"))
    out = [v.name for v in victims] if short > 0 else []
    reason = f"bring {name}'s {state.host_layers} host layers back" + (f", swap out {', '.join(out)}" if out else "")
    return SwapDecision(out, [name], reason, host_layers={name: 0})


def _by_waiting(candidates: list, counts: dict) -> list:
    # the baselines know no tiers or demand: the model with the most waiting requests first
    return sorted(candidates, key=lambda s: (-counts[s.name], s.name))


def ollama_swap_models(registry: ModelRegistry, pending_requests: Any, device_budget: Any,
                       now: float | None = None, *, keep_alive_s: float = 300.0,
                       max_loaded: int = 3) -> SwapDecision:
    """The baseline of Ollama's scheduler (``server/sched.go``): a model idle for
    ``keep_alive_s`` is unloaded; a model that does not fit, or finds ``max_loaded``
    models on the device (``OLLAMA_MAX_LOADED_MODELS``), unloads idle ones in the order of
    ``findRunnerToUnload`` -- by keep-alive, then by name (one keep-alive for all here, so
    by name) -- until it fits. Same signature as :func:`should_swap_models`."""
    keep_alive_s = _seconds(keep_alive_s, "keep_alive_s")
    max_loaded = integer(max_loaded, "max_loaded")
    budget, resident, candidates, counts = _swap_candidates(registry, pending_requests, device_budget, now)
    expired = [s for s in resident if s.status == "loaded" and not s.running
               and s.now - (s.last_used if s.last_used is not None else s.loaded_at) >= keep_alive_s]
    resident = sorted((s for s in resident if s not in expired), key=lambda s: s.name)
    return _plan_swaps(budget, _by_waiting(candidates, counts), resident, _busy, "the first idle by name",
                       max_loaded=max_loaded, swap_out=sorted(s.name for s in expired))


def lru_swap_models(registry: ModelRegistry, pending_requests: Any, device_budget: Any,
                    now: float | None = None) -> SwapDecision:
    """The plain LRU baseline: unload the least recently used idle models until the pending
    one fits. Same signature as :func:`should_swap_models`."""
    budget, resident, candidates, counts = _swap_candidates(registry, pending_requests, device_budget, now)
    resident.sort(key=lambda s: (s.last_used if s.last_used is not None else s.loaded_at or 0.0, s.name))
    return _plan_swaps(budget, _by_waiting(candidates, counts), resident, _busy, "least recently used")


def never_unload_swap_models(registry: ModelRegistry, pending_requests: Any, device_budget: Any,
                             now: float | None = None) -> SwapDecision:
    """The baseline that never unloads: every pending model is loaded whether it fits or
    not -- on a real device, the out-of-memory error it runs into. Same signature as
    :func:`should_swap_models`."""
    budget, _, candidates, counts = _swap_candidates(registry, pending_requests, device_budget, now)
    names = [s.name for s in _by_waiting(candidates, counts)]
    if not names:
        return SwapDecision([], [], "nothing to swap in: no pending request for a model that is not loaded")
    return SwapDecision([], names, f"swap in {', '.join(names)} (never unloads; budget {format_bytes(budget)} "
                        "not checked)")


SWAP_POLICIES = {"memwarden": should_swap_models, "ollama": ollama_swap_models, "lru": lru_swap_models,
                 "never": never_unload_swap_models}
