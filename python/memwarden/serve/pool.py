"""``ModelPool``: several models behind one server, their weights within a device budget.

Every model is an :class:`~memwarden.serve.engine.Engine` (its tokenizer and config stay)
whose weights come and go:

* ``loaded`` -- on the device, counted by the budget; requests run only here;
* ``offloaded`` -- parked in host memory (within ``host_memory``): coming back is a copy;
* ``unloaded`` -- gone: loading builds it again (an embedded model from its config and
  seed, a checkpoint with ``from_pretrained``).

A request holds its model (:meth:`ModelPool.hold`) for as long as it generates. To get
it loaded the pool asks its swap policy (one of :data:`memwarden.controller.models.SWAP_POLICIES`,
all with the signature of ``should_swap_models``) with the waiting requests of every
model that is not loaded, carries the decision out -- park (or unload, when the host
budget is full) what it swaps out, then load what it swaps in -- and otherwise waits
(until ``load_timeout``), asking again as requests end. Every move goes through the
:class:`~memwarden.controller.models.ModelRegistry`, which refuses to move a model with a
running request. A request the pool cannot serve gets :class:`ModelUnavailable` with its
reason: ``model_load_timeout`` (no room was made in time) or ``out_of_memory`` (the load
ran out of device memory: what a policy that never unloads runs into).

The CPU stand-in (``device_limit``): memwarden's host allocator is installed as torch's CPU
allocator with that limit, so the "device" is its pool (weights, KV pages, activations)
and a load beyond it fails with the allocator's out-of-memory error (once an
out-of-memory callback has collected cyclic garbage); parked weights live in numpy's
memory, outside that pool, so parking really gives the device bytes back.

The embedded models (:data:`EMBEDDED_MODELS`) need no download: the server's own tiny
random Llama and larger variants with their own seeds.

May import: torch, transformers (lazily), :mod:`memwarden.serve.engine`,
:mod:`memwarden.controller`, :mod:`memwarden.alloc`, :mod:`memwarden.kv` and the bottom
layers. Never :mod:`memwarden.serve.app` or :mod:`memwarden.cli`.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from memwarden import alloc
from memwarden.controller.models import SWAP_POLICIES, ModelRegistry, ServedModel, should_promote_model
from memwarden.controller.offload import AutomaticOffloader, WeightSlots, find_decoder_layers, restore_together
from memwarden.kv.attention import ATTENTION_NAME
from memwarden.serve.engine import EMBEDDED_NAME, Engine, load_engine

__all__ = ["EMBEDDED_MODELS", "MODEL_STATES", "ModelPool", "ModelUnavailable"]

# config changes over the embedded tiny model, and the seed of its random weights
EMBEDDED_MODELS = {
    EMBEDDED_NAME: ({}, 0),  # load_engine(None)'s model, weight for weight
    "memwarden-small-random": ({"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 6,
                                "num_attention_heads": 8}, 1),
    "memwarden-base-random": ({"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 8,
                               "num_attention_heads": 12}, 2),
}
MODEL_STATES = {"unloaded": 0, "offloaded": 1, "loaded": 2, "loading": 3}  # memwarden:model_state values
UNBOUNDED = 2**62  # a budget no model reaches
_POLL_S = 0.05  # a waiting request asks again this often (minimum residencies expire unannounced)
_MIN_OVERDUE_S = 0.01  # the shortest wait that makes a request overdue
_OVERDUE = 2**60  # an overdue model's pending count: past any demand


class ModelUnavailable(Exception):
    """A request's model could not be loaded for it: ``reason`` (a code) and a sentence."""

    def __init__(self, reason: str, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.reason, self.message, self.retry_after = reason, message, retry_after


@dataclass
class _Model:
    """What the pool keeps of one model besides the registry's books."""

    engine: Engine
    build: Callable[[], torch.nn.Module]  # its weights, freshly made on the device
    # its weights in pieces (see _pieces), each parked in a host buffer of its own while the
    # model is offloaded; kept while it is loaded with layers left in host memory
    pieces: Optional[list] = None
    offloader: Optional[AutomaticOffloader] = None  # runs the layers left in host memory
    promotion_failed_beside: Optional[frozenset] = None  # the models on the device when bringing them back failed
    load_seconds: Optional[float] = None  # how long its last load took (None before the first)
    swaps_in: int = 0
    swaps_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


class _Hold:
    """A request's hold on its model; :meth:`release` (once) lets the model move again."""

    def __init__(self, pool: "ModelPool", name: str):
        self._pool, self.name, self._released = pool, name, False
        self.engine = pool.engine(name)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self.name)


class ModelPool:
    """``models``: ``{name: (engine, build)}`` -- ``build()`` makes the model's weights on
    the device. ``weights_budget``: device bytes for weights (None: no bound).
    ``policy``: a name of :data:`SWAP_POLICIES`; ``policy_options`` go to it (``keep_alive_s``,
    ``max_loaded`` for ``ollama``). ``max_concurrency``: requests holding a model at once,
    all models together (each engine bounds only its own, which several models multiply).
    The first model is loaded now."""

    def __init__(self, models: dict, weights_budget: Optional[int] = None, policy: str = "memwarden", *,
                 policy_options: Optional[dict] = None, host_memory: Optional[int] = None,
                 load_timeout: float = 30.0, min_residency_s: float = 30.0, demand_half_life_s: float = 300.0,
                 device_limit: Optional[int] = None, max_concurrency: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic):
        if not models:
            raise ValueError("models: a pool needs at least one model")
        if policy not in SWAP_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(SWAP_POLICIES)}, got {policy!r}")
        self.policy_name = policy
        self._policy = functools.partial(SWAP_POLICIES[policy], **(policy_options or {}))
        self.weights_budget = UNBOUNDED if weights_budget is None else int(weights_budget)
        self.host_memory = UNBOUNDED if host_memory is None else int(host_memory)
        self.load_timeout = float(load_timeout)
        self.registry = ModelRegistry(clock=clock, demand_half_life_s=demand_half_life_s)
        self._models: dict[str, _Model] = {}
        for name, (engine, build) in models.items():
            self._models[name] = _Model(engine, build)
            pieces = _pieces(engine.model)  # exact even on the meta device
            layers = pieces[1:]  # none when the layers cannot be parked apart
            self.registry.register(ServedModel(name=name, weights_bytes=sum(p.nbytes for p in pieces),
                                               kv_bytes_per_token=0, context=1, min_residency_s=min_residency_s,
                                               num_layers=len(layers),
                                               layer_bytes=max((p.nbytes for p in layers), default=0)))
        self.names = tuple(self._models)
        self.default = self.names[0]
        self.device = torch.device("cpu")  # where build() makes the weights (a GPU pool is still to come)
        self._outside_pool = False
        self._restore_device: list[Callable[[], Any]] = []
        if device_limit is not None:
            self._stand_in(int(device_limit))
        self._cond = threading.Condition()
        self._waiting: dict[str, list] = {name: [] for name in self._models}  # since when each request waits
        self._draining: set = set()  # loaded models taking no new request until a swap can evict them
        self._half_life = float(demand_half_life_s)
        self.out_of_memory = 0
        self._holding = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        with self._cond:  # the first model is there from the start, when it fits
            if self.registry.state(self.default).footprint_bytes <= self.weights_budget:
                self._load(self.default)

    # ---- building ----------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, **overrides) -> "ModelPool":
        """The pool of ``config.server``: its ``models`` (or its one ``model``, the embedded
        model when none) and the swap settings; ``overrides`` replace keyword arguments."""
        server = config.server
        names = list(server.models) or [server.model or EMBEDDED_NAME]
        several = len(names) > 1
        engines = {name: _engine(name, server.max_concurrency) for name in names}
        options = {"keep_alive_s": server.keep_alive, "max_loaded": server.max_loaded} \
            if server.swap_policy == "ollama" else {}
        kwargs = dict(weights_budget=server.max_memory if several else None, policy=server.swap_policy,
                      policy_options=options, host_memory=server.host_memory, load_timeout=server.load_timeout,
                      min_residency_s=server.min_residency, demand_half_life_s=server.demand_half_life,
                      device_limit=server.device_limit, max_concurrency=server.max_concurrency)
        return cls(engines, **{**kwargs, **overrides})

    def _stand_in(self, limit: int) -> None:
        self._outside_pool = True
        previous = alloc.get_memory_limit("cpu")
        if alloc.install("cpu"):
            self._restore_device.append(lambda: alloc.uninstall("cpu"))
        alloc.set_memory_limit("cpu", limit)
        self._restore_device.append(lambda: alloc.set_memory_limit("cpu", previous))
        # finished requests' caches can sit in reference cycles: collect them before an
        # allocation is refused (the allocator retries after its callbacks)
        self._restore_device.append(alloc.on_oom(_collect_garbage, "cpu").remove)

    def close(self) -> None:
        """Let every model's weights go and give the CPU allocator back as it was (the
        stand-in device); the pool serves nothing after."""
        with self._cond:
            for books in self._models.values():
                if books.offloader is not None:
                    books.offloader.detach()
                books.engine.model.to("meta")
                books.pieces = books.offloader = None
        while self._restore_device:
            self._restore_device.pop()()

    # ---- reading ----------------------------------------------------------------------

    def engine(self, name: str) -> Engine:
        try:
            return self._models[name].engine
        except KeyError:
            raise KeyError(f"model {name!r} is not served here") from None

    @property
    def bytes_per_token(self) -> int:
        """The most KV bytes a token takes in any model: what one KV budget prices a token at."""
        return max(m.engine.bytes_per_token for m in self._models.values())

    def stats(self) -> dict:
        """Per model: state, footprint, running and served requests, swaps, bytes moved and
        bytes parked; and the pool's budget, loaded bytes, policy and out-of-memory loads."""
        with self._cond:
            models = {}
            for state in self.registry.states():
                books = self._models[state.name]
                models[state.name] = {
                    "state": state.status, "footprint_bytes": state.footprint_bytes, "running": state.running,
                    "requests": state.use_count, "swaps_in": books.swaps_in, "swaps_out": books.swaps_out,
                    "bytes_in": books.bytes_in, "bytes_out": books.bytes_out, "host_layers": state.host_layers,
                    "offloaded_bytes": _parked_bytes(books)}
            loaded = sum(m["footprint_bytes"] for m in models.values() if m["state"] in ("loaded", "loading"))
            return {"models": models, "swap_policy": self.policy_name, "weights_loaded_bytes": loaded,
                    "weights_budget_bytes": None if self.weights_budget == UNBOUNDED else self.weights_budget,
                    "out_of_memory": self.out_of_memory}

    # ---- serving ----------------------------------------------------------------------

    def hold(self, name: str) -> _Hold:
        """Wait until ``name`` is loaded and hold it there; :class:`ModelUnavailable` when it
        cannot be, ``KeyError`` for a model not served here."""
        self.engine(name)
        deadline = time.monotonic() + self.load_timeout
        with self._cond:
            since = time.monotonic()
            self._waiting[name].append(since)
            try:
                while not self._servable(name):
                    decision = self._policy(self.registry, self._pending(), self.weights_budget)
                    self._draining = set(decision.drain)
                    self._carry_out(decision, name)
                    if self._servable(name):
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ModelUnavailable("model_load_timeout", f"model {name!r} could not be loaded within "
                                               f"{self.load_timeout:g} s: {decision.reason}", retry_after=1.0)
                    # ask again when its requests become overdue, or after a poll
                    overdue_in = self._overdue_at(name) - time.monotonic()
                    self._cond.wait(min(remaining, _POLL_S, overdue_in if overdue_in > 0 else _POLL_S))
                self.registry.begin_request(name)  # from here the model stays, even while the request queues
            finally:
                self._waiting[name].remove(since)
        if self._holding is not None:
            self._holding.acquire()
        return _Hold(self, name)

    def _servable(self, name: str) -> bool:
        """Loaded, and not draining for a swap that waits for its running requests to end."""
        return self.registry.state(name).status == "loaded" and name not in self._draining

    def _release(self, name: str) -> None:
        if self._holding is not None:
            self._holding.release()
        with self._cond:
            self.registry.end_request(name)
            for partial in [n for n, books in self._models.items() if books.offloader is not None]:
                self._promote(partial)
            self._cond.notify_all()

    def _pending(self) -> dict:
        """Waiting requests of the models not loaded, by model: their count, or past every
        demand (:data:`_OVERDUE`) once the oldest has waited its model's load time --
        waiting longer than a swap takes is never cheaper than swapping (ski rental), so
        no request waits much longer than that for a model that idle ones could make room
        for, and no model starves behind a busier one."""
        loaded = self._on_device()
        now = time.monotonic()
        return {name: len(waits) + (_OVERDUE if now >= self._overdue_at(name) else 0)
                for name, waits in self._waiting.items() if waits and name not in loaded}

    def _overdue_at(self, name: str) -> float:
        """When ``name``'s oldest waiting request has waited its model's load time (capped
        by the demand half-life, at least 10 ms)."""
        unit = min(max(self._expected_load_seconds(name), _MIN_OVERDUE_S), self._half_life)
        return min(self._waiting[name]) + unit

    def _expected_load_seconds(self, name: str) -> float:
        """``name``'s last load time; before its first, its bytes at the seconds per byte of
        the loads measured so far (one second when there were none)."""
        seconds = self._models[name].load_seconds
        if seconds is not None:
            return seconds
        measured = [(books.load_seconds, self.registry.state(other).weights_footprint_bytes)
                    for other, books in self._models.items() if books.load_seconds is not None]
        if not measured:
            return 1.0
        per_byte = sum(s for s, _ in measured) / max(sum(n for _, n in measured), 1)
        return per_byte * self.registry.state(name).weights_footprint_bytes

    def _carry_out(self, decision, wanted: str) -> None:
        for name in decision.swap_out:
            self._evict(name)
        for name in decision.swap_in:
            error = self._load(name, decision.host_layers.get(name, 0))
            if error is not None and name == wanted:
                raise ModelUnavailable("out_of_memory", f"loading model {name!r} ran out of device memory: {error}")

    # ---- moves (under the lock, which a load lets go of while it copies) ----------------

    def _load(self, name: str, host_layers: int = 0) -> Optional[str]:
        """Bring ``name`` onto the device (restore it when parked, but its last
        ``host_layers`` decoder layers, which an offloader then runs from host memory; else
        build it); the error when the device runs out of memory, which leaves it unloaded
        (and parked, if it was). The copy or build runs with the lock let go: requests to
        the loaded models go on meanwhile, and the registry's ``loading`` keeps the bytes."""
        books = self._models[name]
        self.registry.mark_loading(name)
        started = time.monotonic()
        pieces = books.pieces
        restored = pieces[:len(pieces) - host_layers] if pieces is not None else []
        try:
            with self._unlocked():
                if pieces is not None:  # one allocation, a copy per piece
                    restore_together(restored, self.device)
                else:
                    model = books.build()
                    model.set_attn_implementation(ATTENTION_NAME)
            if pieces is None:
                books.engine.model = model
            elif host_layers:  # a new placement: an earlier failed promotion says nothing of it
                books.offloader = AutomaticOffloader(books.engine.model, device=self.device,
                                                     parked=pieces[-host_layers:])
                books.promotion_failed_beside = None
            else:
                books.pieces = None
        except torch.OutOfMemoryError as exc:  # before any piece was repointed: still parked
            self.out_of_memory += 1
            error = str(exc).splitlines()[0]
        else:
            books.load_seconds = time.monotonic() - started
            nbytes = WeightSlots(books.engine.model).nbytes
            self.registry.mark_loaded(name, measured_bytes=nbytes, host_layers=host_layers)
            books.swaps_in += 1
            books.bytes_in += sum(piece.nbytes for piece in restored) if restored else nbytes
            self._cond.notify_all()  # its other waiters need not wait for their next poll
            return None
        # the half-made model is held by the traceback's reference cycles: free it now
        gc.collect()
        self.registry.mark_unloaded(name)
        return error

    @contextlib.contextmanager
    def _unlocked(self):
        self._cond.release()
        try:
            yield
        finally:
            self._cond.acquire()

    def _evict(self, name: str) -> None:
        """Park ``name`` in host memory when the host budget has room, else unload it."""
        books = self._models[name]
        if books.offloader is not None:  # its host layers stay parked where they are
            books.offloader.detach()
            books.offloader = None
        pieces = books.pieces or _pieces(books.engine.model)
        on_device = [piece for piece in pieces if not piece.parked]
        nbytes = sum(piece.nbytes for piece in pieces)
        others = sum(_parked_bytes(m) for m in self._models.values() if m is not books)
        if others + nbytes <= self.host_memory:
            for piece in on_device:
                piece.park(outside_pool=self._outside_pool)
            books.pieces = pieces
            self.registry.mark_offloaded(name)
        else:
            books.engine.model.to("meta")
            books.pieces = None
            self.registry.mark_unloaded(name)
        books.swaps_out += 1
        books.bytes_out += sum(piece.nbytes for piece in on_device)

    def _on_device(self) -> frozenset:
        return frozenset(s.name for s in self.registry.states() if s.status in ("loaded", "loading"))

    def _promote(self, name: str) -> None:
        """Bring an idle model's host layers back onto the device when the budget has room
        for them, once the models :func:`should_promote_model` names give way. Out of
        memory leaves them in host memory, and no new try is made until the models on the
        device change (each try costs the allocator's out-of-memory callbacks)."""
        books = self._models[name]
        if self.registry.state(name).running:
            return  # its forwards read the layers the offloader streams
        if books.promotion_failed_beside == self._on_device():
            return
        decision = should_promote_model(self.registry, name, self.weights_budget)
        if not decision.swap_in:
            return
        for victim in decision.swap_out:
            self._evict(victim)
        parked = _parked_bytes(books)
        action = books.offloader.close()  # layer by layer: each fits where a freed one did
        left = len(books.offloader.offloaded)
        self.registry.set_host_layers(name, left)
        books.bytes_in += parked - _parked_bytes(books)
        if not left:
            books.pieces = books.offloader = books.promotion_failed_beside = None
        elif action.error:  # out of memory: the rest stay in host memory, the model still runs
            self.out_of_memory += 1
            books.promotion_failed_beside = self._on_device()


def _collect_garbage(_nbytes: int) -> bool:
    """The stand-in device's out-of-memory callback: whether collecting freed anything. The
    young generations first -- a finished request's cycles are young, and a full collection
    of a process holding models takes tens of milliseconds, paid by whichever request
    allocates next."""
    return gc.collect(1) > 0 or gc.collect() > 0


def _pieces(model: torch.nn.Module) -> list:
    """``model``'s weights as pieces that park on their own: everything but the decoder
    layers, then each layer (so the model can come back with some left in host memory);
    one piece when its layers cannot be told apart (no layer list, or a tensor tied across)."""
    try:
        layers = list(find_decoder_layers(model))
    except ValueError:
        return [WeightSlots(model)]
    pieces = [WeightSlots(model, exclude=layers), *(WeightSlots(layer) for layer in layers)]
    tensors = [id(slot.get()) for piece in pieces for slot in piece.slots]
    return pieces if len(tensors) == len(set(tensors)) else [WeightSlots(model)]


def _parked_bytes(books: _Model) -> int:
    return sum(piece.nbytes for piece in books.pieces if piece.parked) if books.pieces else 0


# ---- the engines --------------------------------------------------------------------------

def _engine(name: str, max_concurrency: int) -> tuple[Engine, Callable[[], torch.nn.Module]]:
    """(an engine over the model's skeleton on the meta device, how to build its weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name in EMBEDDED_MODELS:
        tiny = _tiny_engine()
        changes, seed = EMBEDDED_MODELS[name]
        config = type(tiny.model.config)(**{**tiny.model.config.to_dict(), **changes})
        tokenizer = tiny.tokenizer

        def build() -> torch.nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)

        def build() -> torch.nn.Module:
            return AutoModelForCausalLM.from_pretrained(name).eval()

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if name in EMBEDDED_MODELS
                                                    else getattr(config, "dtype", None)).eval()
    return Engine(skeleton, tokenizer, name, max_concurrency=max_concurrency), build


@functools.cache
def _tiny_engine() -> Engine:
    """The embedded model's config and tokenizer, which the variants start from."""
    return load_engine(None)

