"""Monitor: samples memory from torch (``torch.cuda.memory_allocated`` / ``mem_get_info``),
NVML when ``pynvml`` is present, memwarden's allocator (:mod:`memwarden.alloc`) and the
host; keeps a bounded history, compares against thresholds, raises alerts, shows its state
(``repr``, a table in notebooks) and plots its history (matplotlib imported lazily). Optional dependencies are imported inside the functions that
need them: psutil for the host, pynvml for NVML, the extension (through
:mod:`memwarden.alloc`) for the allocator's figures; a missing one only leaves its figures
out of the samples.

What is read, per device key (``"cpu"``, ``"cuda:N"``):

* ``"cpu"``: psutil's ``virtual_memory`` (``used = total - available``), the process's
  RSS, and memwarden's allocator counters when it is installed for the CPU;
* ``"cuda:N"`` (only when ``torch.cuda.is_available()``): once CUDA is initialised,
  ``torch.cuda.mem_get_info`` and the caching allocator's allocated/reserved bytes (or
  memwarden's, when its allocator serves the device); NVML's used/total and utilisation
  when pynvml loads. The monitor never initialises CUDA itself --
  ``memwarden.alloc.install("cuda")`` has to come before that -- so before it, NVML is the
  only source.

**Pressure** is ``in_use / limit``: with a ``budget_bytes`` the limit is that budget and
``in_use`` what this process holds on the watched device (RSS on the host, reserved bytes
on a GPU); without one the limit is the device's total and ``in_use`` its used bytes,
whoever holds them. Thresholds (warning, critical, emergency) split pressure into levels;
an alert fires for each threshold crossed upward, once per crossing.

May import: :mod:`memwarden.alloc` and the bottom layers. Never :mod:`memwarden.serve`,
:mod:`memwarden.cli` or :mod:`memwarden.testing`.
"""
from __future__ import annotations

import collections
import functools
import logging
import math
import os
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from memwarden._devices import memory_device
from memwarden._plot import GIB, figure
from memwarden._table import html_table
from memwarden._units import format_bytes, parse_bytes

__all__ = ["DeviceMemory", "MemorySample", "MemoryMonitor", "LEVELS"]

log = logging.getLogger(__name__)

LEVELS = ("normal", "warning", "critical", "emergency")
# What each level asks of the controller; a level needs its own actions and those below it.
_ACTIONS = {
    "warning": ("evict idle sessions",),
    "critical": ("compress KV to INT8",),
    "emergency": ("reject new sessions",),
}
_LEVEL_COLORS = {"warning": "#e8a33d", "critical": "#d62728", "emergency": "#7b0000"}

Source = Callable[[], "tuple[int, int]"]
AlertCallback = Callable[[str, "MemorySample"], Any]


@dataclass(frozen=True)
class DeviceMemory:
    """One device's figures in bytes. ``used + free == total``; ``process_used`` is what this
    process holds (RSS, or reserved GPU bytes; ``used`` when nothing finer is known);
    ``allocated``/``reserved``/``peak_allocated`` come from the tensor allocator serving
    the device and ``utilization`` (0..1) from NVML, each ``None`` when not read."""

    used: int
    total: int
    process_used: int
    allocated: int | None = None
    reserved: int | None = None
    peak_allocated: int | None = None
    utilization: float | None = None

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass(frozen=True)
class MemorySample:
    """What :meth:`MemoryMonitor.sample` read at ``time`` (``time.time()``): every device's
    figures, and the watched ``device``'s ``pressure = in_use / limit`` and its ``level``."""

    time: float
    device: str
    devices: Mapping[str, DeviceMemory]
    limit: int
    in_use: int
    pressure: float
    level: str

    @property
    def watched(self) -> DeviceMemory:
        return self.devices[self.device]

    @property
    def headroom(self) -> int:
        """Bytes that may still be taken: what the limit leaves, but never more than the
        device has free (a budget can exceed what other processes left)."""
        return max(0, min(self.limit - self.in_use, self.watched.free))

    @property
    def gpu_utilization(self) -> float | None:
        """NVML's utilisation of the watched GPU, else of the first GPU read; ``None``
        without NVML."""
        if self.watched.utilization is not None:
            return self.watched.utilization
        return next((d.utilization for key, d in self.devices.items()
                     if key.startswith("cuda:") and d.utilization is not None), None)


# ---- readers ------------------------------------------------------------------------------

def _allocator():
    """:mod:`memwarden.alloc`, or ``None`` when the extension is not built or fails to load."""
    try:
        import memwarden.alloc as alloc
    except (ImportError, OSError):
        return None
    return alloc


@functools.cache
def _nvml():
    """pynvml, initialised once per process; ``None`` when it is absent or finds no driver."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError without a driver: no NVML, not a failure
        return None
    return pynvml


def _nvml_handle(nvml, index: int, torch):
    """NVML's handle of CUDA device ``index``. NVML counts every GPU in PCI order, CUDA only
    the visible ones, fastest first by default: match by PCI bus id once CUDA is up (its
    properties need it), else through ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs)."""
    if torch.cuda.is_initialized():
        props = torch.cuda.get_device_properties(index)
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return nvml.nvmlDeviceGetHandleByIndex(index)
    entry = visible[index]
    return (nvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit()
            else nvml.nvmlDeviceGetHandleByUUID(entry))


def _host_memory() -> dict[str, DeviceMemory]:
    try:
        import psutil
    except ImportError:
        return {}
    vm = psutil.virtual_memory()
    allocated = peak = reserved = None
    alloc = _allocator()
    if alloc is not None and alloc.is_installed("cpu"):
        allocated, peak = alloc.memory_allocated("cpu"), alloc.max_memory_allocated("cpu")
        reserved = alloc.memory_reserved("cpu")
    return {"cpu": DeviceMemory(used=vm.total - vm.available, total=vm.total,
                                process_used=psutil.Process().memory_info().rss,
                                allocated=allocated, reserved=reserved, peak_allocated=peak)}


def _cuda_memory() -> dict[str, DeviceMemory]:
    import torch
    if not torch.cuda.is_available():
        return {}
    nvml = _nvml()
    initialized = torch.cuda.is_initialized()
    alloc = _allocator() if initialized else None
    readings = {}
    for index in range(torch.cuda.device_count()):
        key = f"cuda:{index}"
        used = total = allocated = reserved = peak = utilization = None
        if initialized:
            free, total = torch.cuda.mem_get_info(index)
            used = total - free
            # PyTorch's statistics do not see a pluggable allocator: ask memwarden's own
            stats = alloc if alloc is not None and alloc.is_installed(key) else torch.cuda
            allocated, reserved = stats.memory_allocated(index), stats.memory_reserved(index)
            peak = stats.max_memory_allocated(index)
        if nvml is not None:
            try:
                handle = _nvml_handle(nvml, index, torch)
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
            except Exception:  # NVMLError (e.g. a MIG slice or an unmatched id): no NVML figures
                log.debug("no NVML reading for %s", key, exc_info=True)
            else:
                if used is None:
                    used, total = int(info.used), int(info.total)
        if used is None:
            continue  # neither CUDA initialised nor NVML: nothing to read without waking CUDA
        readings[key] = DeviceMemory(used=used, total=total,
                                     process_used=used if reserved is None else reserved,
                                     allocated=allocated, reserved=reserved, peak_allocated=peak,
                                     utilization=utilization)
    return readings


def _read_source(key: str, source: Source) -> DeviceMemory:
    reading = source()
    try:
        used, total = reading
    except (TypeError, ValueError):
        raise ValueError(f"sources[{key!r}] must return (used, total) bytes, got {reading!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (used, total)) \
            or total <= 0 or not 0 <= used <= total:
        raise ValueError(f"sources[{key!r}] must return ints with 0 <= used <= total and "
                         f"total > 0, got {reading!r}")
    return DeviceMemory(used=used, total=total, process_used=used)


# ---- the monitor --------------------------------------------------------------------------

def _device_name(value: Any) -> str:
    return memory_device(value, "'cpu' or 'cuda[:N]' (or a GPU index)",
                         "the monitor reads host and CUDA memory only, not {key!r}")


def _check_thresholds(thresholds: Any) -> tuple[float, float, float]:
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be three numbers (warning, critical, emergency), "
                         f"got {thresholds!r}") from None
    if len(values) != 3 or not all(0 < t <= 1 for t in values) \
            or not values[0] < values[1] < values[2]:
        raise ValueError(f"thresholds must be three increasing fractions in (0, 1] "
                         f"(warning, critical, emergency), got {thresholds!r}")
    return values


class MemoryMonitor:
    """Samples memory, keeps the last ``history`` samples, and calls the :meth:`on_alert`
    callbacks when the watched device's pressure crosses a threshold upward.

    ``budget_bytes`` (bytes or a size string) is the limit pressure is measured against;
    ``None`` measures against the device's total. ``spike_reserve`` is the fraction of the
    limit kept free for spikes when sizing contexts. ``sources`` replaces the readers: a
    callable returning ``(used, total)`` for ``device``, or a mapping of device to such
    callables; only those devices are then sampled (for deterministic tests and for memory
    memwarden cannot read itself).
    """

    def __init__(self, budget_bytes: int | str | None = None, device: Any = "cpu",
                 thresholds: tuple[float, float, float] = (0.75, 0.85, 0.95),
                 spike_reserve: float = 0.10, history: int = 1024, interval: float = 1.0,
                 sources: Source | Mapping[Any, Source] | None = None) -> None:
        self.device = _device_name(device)
        self.budget_bytes = None if budget_bytes is None else parse_bytes(budget_bytes, "budget_bytes")
        if self.budget_bytes == 0:
            raise ValueError("budget_bytes must be positive, got 0")
        self.thresholds = _check_thresholds(thresholds)
        if isinstance(spike_reserve, bool) or not isinstance(spike_reserve, (int, float)) \
                or not 0 <= spike_reserve < 1:
            raise ValueError(f"spike_reserve must be a fraction in [0, 1), got {spike_reserve!r}")
        self.spike_reserve = float(spike_reserve)
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an int >= 1, got {history!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
                or not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
        self.interval = float(interval)
        self._sources = self._check_sources(sources)
        self._history: collections.deque[MemorySample] = collections.deque(maxlen=history)
        self._callbacks: list[AlertCallback] = []
        self._models: dict[str, dict[str, Any]] = {}
        self._level = 0  # index into LEVELS of the last sample
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _check_sources(self, sources) -> dict[str, Source] | None:
        if sources is None:
            return None
        if callable(sources):
            sources = {self.device: sources}
        if not isinstance(sources, Mapping):
            raise ValueError(f"sources must be a callable or a mapping of device to callables, "
                             f"got {type(sources).__name__}")
        checked = {}
        for device, source in sources.items():
            if not callable(source):
                raise ValueError(f"sources[{device!r}] must be a callable returning (used, total)")
            checked[_device_name(device)] = source
        if self.device not in checked:
            raise ValueError(f"sources has no reader for the watched device {self.device!r} "
                             f"(it reads {sorted(checked)})")
        return checked

    # ---- sampling -------------------------------------------------------------------------

    def _read(self) -> dict[str, DeviceMemory]:
        if self._sources is not None:
            return {key: _read_source(key, source) for key, source in self._sources.items()}
        readings = _host_memory()
        readings.update(_cuda_memory())
        return readings

    def sample(self) -> MemorySample:
        """Read every device now, append the sample to the history, fire the alerts due."""
        devices = self._read()
        if self.device not in devices:
            raise RuntimeError(f"no memory reading for {self.device!r}: "
                               + ("install psutil to read host memory" if self.device == "cpu"
                                  else "initialise CUDA, or install nvidia-ml-py for NVML"))
        watched = devices[self.device]
        limit = self.budget_bytes or watched.total
        in_use = watched.process_used if self.budget_bytes else watched.used
        pressure = in_use / limit
        level = sum(pressure >= t for t in self.thresholds)
        sample = MemorySample(time=time.time(), device=self.device,
                              devices=types.MappingProxyType(devices), limit=limit,
                              in_use=in_use, pressure=pressure, level=LEVELS[level])
        with self._lock:
            self._history.append(sample)
            crossed, self._level = LEVELS[self._level + 1:level + 1], level
            callbacks = list(self._callbacks)
        # one call per threshold crossed, lowest first: a handler waiting for "critical"
        # still hears of it when pressure jumps straight to emergency
        for crossed_level in crossed:
            for callback in callbacks:
                try:
                    callback(crossed_level, sample)
                except Exception:  # one failing handler must not silence the others or the sampler
                    log.exception("memory alert callback %r failed", callback)
        return sample

    @property
    def history(self) -> list[MemorySample]:
        """The kept samples, oldest first (at most ``history`` of them)."""
        with self._lock:
            return list(self._history)

    @property
    def latest(self) -> MemorySample | None:
        with self._lock:
            return self._history[-1] if self._history else None

    def on_alert(self, callback: AlertCallback) -> AlertCallback:
        """Call ``callback(level, sample)`` whenever pressure crosses a threshold upward.
        Returns ``callback``, so it works as a decorator."""
        if not callable(callback):
            raise ValueError(f"callback must be callable, got {callback!r}")
        with self._lock:
            self._callbacks.append(callback)
        return callback

    # ---- the sampling thread --------------------------------------------------------------

    def start(self) -> bool:
        """Sample every ``interval`` seconds on a daemon thread; False if it already runs."""
        with self._lock:
            if self._thread is not None:
                return False
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="memwarden-monitor", daemon=True)
            self._thread.start()
        return True

    def stop(self) -> bool:
        """Stop the sampling thread and wait for it; False if none ran."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return False
        self._stop.set()
        thread.join()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a failed reading is logged; the next one may succeed
                log.exception("memory sample failed")
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- health and sizing ----------------------------------------------------------------

    def register_model(self, name: str, bytes: int | str, device: Any,
                       max_context: int | None = None) -> None:
        """Record a loaded model (its weights' bytes and device) for :meth:`check_system_health`;
        ``max_context`` caps :meth:`adjust_context_window`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if max_context is not None and (isinstance(max_context, bool)
                                        or not isinstance(max_context, int) or max_context < 1):
            raise ValueError(f"max_context must be an int >= 1 or None, got {max_context!r}")
        state = {"bytes": parse_bytes(bytes, "bytes"), "device": _device_name(device),
                 "max_context": max_context}
        with self._lock:
            self._models[name] = state

    def unregister_model(self, name: str) -> None:
        with self._lock:
            if self._models.pop(name, None) is None:
                raise KeyError(f"no model registered as {name!r}")

    def check_system_health(self, model_states: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Take a sample and report ``memory_pressure``, ``level``, ``gpu_utilization``
        (``None`` without NVML), ``model_states`` (the registered models, updated by the
        ``model_states`` given) and ``actions_needed``: the level's actions and those of the
        levels below it, mildest first."""
        sample = self.sample()
        with self._lock:
            states: dict[str, Any] = {name: dict(state) for name, state in self._models.items()}
        states.update(model_states or {})
        level = LEVELS.index(sample.level)
        return {"memory_pressure": sample.pressure, "level": sample.level,
                "gpu_utilization": sample.gpu_utilization, "model_states": states,
                "actions_needed": [a for lvl in LEVELS[1:level + 1] for a in _ACTIONS[lvl]]}

    def adjust_context_window(self, current_load: int, model: str | int | None,
                              bytes_per_token: int) -> dict[str, Any]:
        """The longest context each of ``current_load`` concurrent sequences can have now::

            usable          = max(0, headroom - spike_reserve * limit)
            optimal_context = min(usable // (bytes_per_token * current_load), max_context)

        where ``headroom = min(limit - in_use, device free)`` comes from a fresh sample and
        ``max_context`` from ``model``: a registered model's name, an int, or ``None`` (no
        cap). Returns ``optimal_context``, ``memory_impact`` (the bytes those contexts take:
        ``optimal_context * bytes_per_token * current_load``) and ``performance_impact``
        (the fraction of ``max_context`` given up, 0.0 without a cap), plus ``usable_bytes``.
        """
        if isinstance(current_load, bool) or not isinstance(current_load, int) or current_load < 1:
            raise ValueError(f"current_load must be an int >= 1 (concurrent sequences), got {current_load!r}")
        if isinstance(bytes_per_token, bool) or not isinstance(bytes_per_token, int) or bytes_per_token < 1:
            raise ValueError(f"bytes_per_token must be an int >= 1, got {bytes_per_token!r}")
        max_context = self._max_context(model)
        sample = self.sample()
        usable = max(0, int(sample.headroom - self.spike_reserve * sample.limit))
        optimal = usable // (bytes_per_token * current_load)
        if max_context is not None:
            optimal = min(optimal, max_context)
        return {"optimal_context": optimal,
                "memory_impact": optimal * bytes_per_token * current_load,
                "performance_impact": 0.0 if max_context is None else 1 - optimal / max_context,
                "usable_bytes": usable}

    def _max_context(self, model: str | int | None) -> int | None:
        if model is None:
            return None
        if isinstance(model, str):
            with self._lock:
                if model not in self._models:
                    raise ValueError(f"model {model!r} is not registered (register_model first)")
                return self._models[model]["max_context"]
        if isinstance(model, bool) or not isinstance(model, int) or model < 1:
            raise ValueError(f"model must be a registered name, a max context (int >= 1) or None, "
                             f"got {model!r}")
        return model

    # ---- displays -------------------------------------------------------------------------

    def _state(self) -> str:
        return "running" if self.running else "stopped"

    def _limit_name(self) -> str:
        return "budget" if self.budget_bytes else "total"

    def __repr__(self) -> str:
        samples = self.history
        if not samples:
            budget = f"budget {format_bytes(self.budget_bytes)}" if self.budget_bytes else "no budget"
            return f"<MemoryMonitor {self.device}, {budget}, {self._state()}: no samples>"
        last = samples[-1]
        return (f"<MemoryMonitor {self.device}: pressure {last.pressure:.1%} ({last.level}), "
                f"{format_bytes(last.in_use)} of {format_bytes(last.limit)} {self._limit_name()} in use, "
                f"{len(samples)} samples, {self._state()}>")

    def _repr_html_(self) -> str:
        """The latest sample as one table: its pressure first, then every device's figures."""
        samples = self.history
        footer = [", ".join(f"{name} at {t:.0%}" for name, t in zip(LEVELS[1:], self.thresholds)),
                  f"{len(samples)} samples kept, every {self.interval:g}s ({self._state()})"]
        if not samples:
            return html_table(f"memory monitor on {self.device}: no samples", [], [], footer)
        last = samples[-1]
        title = (f"memory on {self.device}: pressure {last.pressure:.1%} ({last.level}), "
                 f"{format_bytes(last.in_use)} of {format_bytes(last.limit)} {self._limit_name()} in use")
        rows = [[key, format_bytes(d.used), format_bytes(d.total), format_bytes(d.free), format_bytes(d.process_used),
                 format_bytes(d.allocated), format_bytes(d.reserved)] for key, d in last.devices.items()]
        footer.insert(1, f"peak pressure {max(s.pressure for s in samples):.1%} over the kept samples")
        return html_table(title, ["device", "used", "total", "free", "this process", "allocated", "reserved"],
                          rows, footer)

    def plot(self, path: str | os.PathLike | None = None):
        """A matplotlib Figure of the history: the watched device's pressure against the
        warning/critical/emergency thresholds, and every device's used bytes (with a
        budget, also what pressure counts as in use, and the budget). With ``path`` (any
        format matplotlib writes) the figure is saved there and the path returned instead.
        Needs matplotlib."""
        samples = self.history
        if not samples:
            raise ValueError("no samples to plot: call sample() or start() first")
        fig = figure(8, 6)
        from matplotlib.ticker import PercentFormatter  # after figure(), which says what to install without it

        start = samples[0].time
        seconds = [s.time - start for s in samples]
        pressure_axes, bytes_axes = fig.subplots(2, 1, sharex=True)
        pressure_axes.plot(seconds, [s.pressure for s in samples], label=f"{self.device} pressure", color="black")
        for name, threshold in zip(LEVELS[1:], self.thresholds):
            pressure_axes.axhline(threshold, linestyle="--", linewidth=0.8, color=_LEVEL_COLORS[name],
                                  label=f"{name} {threshold:.0%}")
        pressure_axes.yaxis.set_major_formatter(PercentFormatter(1.0))
        pressure_axes.set_ylabel("in use / limit")
        pressure_axes.set_title(f"memory on {self.device}: {samples[-1].level} at {samples[-1].pressure:.1%}",
                                fontsize=10)
        for key in sorted({key for s in samples for key in s.devices}):
            points = [(t, s.devices[key].used / GIB) for t, s in zip(seconds, samples) if key in s.devices]
            bytes_axes.plot(*zip(*points), label=f"{key} used")
        if self.budget_bytes:
            bytes_axes.plot(seconds, [s.in_use / GIB for s in samples], label=f"{self.device} in use (this process)")
            bytes_axes.axhline(self.budget_bytes / GIB, linestyle="--", linewidth=0.8, color="black",
                               label=f"budget {format_bytes(self.budget_bytes)}")
        bytes_axes.set_ylabel("GiB")
        bytes_axes.set_xlabel("seconds")
        for axes in (pressure_axes, bytes_axes):
            axes.legend(loc="upper left", fontsize="small", bbox_to_anchor=(1.0, 1.0))  # beside, not on the lines
        if path is None:
            return fig
        path = Path(path)
        fig.savefig(path)
        return path
