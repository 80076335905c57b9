"""MemoryTracker: a background sampler with phases, iteration marks, analysis, export, plot."""
from __future__ import annotations

import contextlib
import csv
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import _sources as src
from memwarden._table import html_table
from memwarden._units import format_bytes, parse_bytes

__all__ = ["MemoryTracker", "Sample", "Analysis", "Trend", "plot_series"]

FIELDS = ("allocated", "reserved", "device_used", "host_rss")


@dataclass
class Sample:
    t: float                      # seconds since start
    allocated: int | None
    reserved: int | None
    device_used: int | None
    host_rss: int
    phase: str | None
    step: int


@dataclass
class Trend:
    """Growth of memory per iteration (Theil-Sen slope of the value at each ``step()``)."""
    slope: float                  # bytes per iteration
    total_growth: int             # last - first
    iterations: int
    increasing_fraction: float    # share of iterations that grew memory
    leak_suspected: bool


@dataclass
class Analysis:
    metric: str
    peak: int
    peak_t: float
    peak_phase: str | None
    baseline: int
    final: int
    trend: Trend | None
    spikes: list[dict] = field(default_factory=list)
    phases: dict[str, dict] = field(default_factory=dict)
    spike_threshold: int | None = None  # a sample above it is a spike

    def __str__(self) -> str:
        s = (f"{self.metric}: peak {format_bytes(self.peak, digits=1)} at {self.peak_t:.3f}s"
             f"{' in ' + self.peak_phase if self.peak_phase else ''}, "
             f"baseline {format_bytes(self.baseline, digits=1)}, final {format_bytes(self.final, digits=1)}")
        if self.trend:
            s += (f"; trend {format_bytes(self.trend.slope, signed=True, digits=1)}/iteration over "
                  f"{self.trend.iterations} iterations"
                  + (" (LEAK SUSPECTED)" if self.trend.leak_suspected else ""))
        if self.spikes:
            s += f"; {len(self.spikes)} spike(s)"
        return s

    def __repr__(self) -> str:
        return f"<Analysis {self}>"

    def table(self) -> tuple:
        """(title, header, rows, footer): the peak in the title, the peak of each phase in
        the rows, baseline, final, trend and spikes below."""
        title = (f"{self.metric}: peak {format_bytes(self.peak, digits=1)} at {self.peak_t:.3f}s"
                 + (f" in {self.peak_phase}" if self.peak_phase else ""))
        rows = [[name, format_bytes(p["peak"], digits=1), p["samples"]] for name, p in self.phases.items()]
        footer = [f"baseline {format_bytes(self.baseline, digits=1)}, final {format_bytes(self.final, digits=1)} "
                  f"({format_bytes(self.final - self.baseline, signed=True, digits=1)})"]
        if self.trend:
            footer.append(f"trend {format_bytes(self.trend.slope, signed=True, digits=1)}/iteration over "
                          f"{self.trend.iterations} iterations"
                          + (", LEAK SUSPECTED" if self.trend.leak_suspected else ""))
        if self.spikes:
            footer.append(f"{len(self.spikes)} spike(s) above {format_bytes(self.spike_threshold, digits=1)}")
        return title, ["phase", "peak", "samples"] if rows else [], rows, footer

    def _repr_html_(self) -> str:
        return html_table(*self.table())


def _theil_sen(ys: list[int]) -> float:
    slopes = [(ys[j] - ys[i]) / (j - i) for i in range(len(ys)) for j in range(i + 1, len(ys))]
    return statistics.median(slopes) if slopes else 0.0


class MemoryTracker:
    """Sample memory in a background thread every ``interval`` seconds.

    >>> with MemoryTracker(interval=0.005) as tr:
    ...     for i in range(10):
    ...         with tr.phase("step"):
    ...             work()
    ...         tr.step()
    >>> tr.analyze().trend.leak_suspected

    Each sample holds the allocator's allocated/reserved bytes (memwarden's allocator or
    PyTorch's on CUDA; None on the host without memwarden's allocator), the driver's used
    bytes on CUDA and the process RSS. ``step()`` marks the end of an iteration: a
    synchronous sample used by the trend analysis.
    """

    def __init__(self, device: Any = None, interval: float = 0.01, max_samples: int = 200_000,
                 trim: bool | None = None):
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.device = src.resolve_device(device)
        self.interval = float(interval)
        self.max_samples = int(max_samples)
        self.samples: list[Sample] = []
        self.steps: list[Sample] = []
        self.phase_spans: list[tuple[str, float, float | None]] = []
        self._phase: str | None = None
        self._step = 0
        self._t0 = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._has_alloc = src.allocator_stats(self.device) is not None
        self.trim = (src.device_type(self.device) == "cpu") if trim is None else bool(trim)

    # sampling -------------------------------------------------------------------
    def _read(self) -> Sample:
        alloc = reserved = None
        if self._has_alloc:
            st = src.allocator_stats(self.device) or {}
            alloc = st.get("allocated_bytes.all.current")
            reserved = st.get("reserved_bytes.all.current")
        return Sample(time.monotonic() - self._t0, alloc, reserved,
                      src.device_used_bytes(self.device), src.host_rss(), self._phase, self._step)

    def sample(self) -> Sample:
        with self._lock:  # read under the lock: samples stay in time order
            s = self._read()
            if len(self.samples) < self.max_samples:
                self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "MemoryTracker":
        if self._thread is not None:
            raise RuntimeError("MemoryTracker already started")
        self._t0 = time.monotonic()
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="memwarden-tracker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> "MemoryTracker":
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()
            if self._phase is not None:
                self._close_phase()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None

    def __enter__(self) -> "MemoryTracker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # phases and iterations --------------------------------------------------------
    def _close_phase(self) -> None:
        name, t0, _ = self.phase_spans[-1]
        self.phase_spans[-1] = (name, t0, time.monotonic() - self._t0)
        self._phase = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Label the samples taken inside the block (phases do not nest)."""
        prev = self._phase
        if prev is not None:
            self._close_phase()
        self._phase = str(name)
        self.phase_spans.append((self._phase, time.monotonic() - self._t0, None))
        self.sample()
        try:
            yield
        finally:
            self.sample()
            self._close_phase()
            if prev is not None:
                self._phase = prev
                self.phase_spans.append((prev, time.monotonic() - self._t0, None))

    def step(self) -> Sample:
        """Mark the end of one iteration of a loop: a synchronous sample for the trend.

        On the host, free heap pages are first given back (``malloc_trim``, ~1 ms) so that
        RSS follows what is really in use rather than glibc's retained arenas."""
        if self.trim:
            src.malloc_trim()
        s = self.sample()
        self.steps.append(s)
        self._step += 1
        return s

    # analysis ---------------------------------------------------------------------
    def metric(self) -> str:
        """The most precise series present: allocated, then device_used, then host_rss."""
        for name in ("allocated", "device_used", "host_rss"):
            if self.samples and getattr(self.samples[0], name) is not None:
                return name
        return "host_rss"

    def analyze(self, metric: str | None = None, *, min_slope: Any = "256 KiB",
                min_growth: Any = "4 MiB", spike_factor: float = 4.0,
                min_spike: Any = "16 MiB") -> Analysis:
        """Peak, growth trend per ``step()`` and spikes of one series.

        A leak is suspected when the Theil-Sen slope over the step values is at least
        ``min_slope`` per iteration, the total growth at least ``min_growth`` and at least
        60% of the iterations grew. A spike is a sample that exceeds the median of the
        series by ``spike_factor`` times the median absolute deviation and ``min_spike``.
        """
        metric = metric or self.metric()
        if metric not in FIELDS:
            raise ValueError(f"metric must be one of {FIELDS}, got {metric!r}")
        with self._lock:
            samples = [s for s in self.samples if getattr(s, metric) is not None]
        if not samples:
            raise ValueError(f"no samples with {metric!r} (was the tracker started?)")
        vals = [getattr(s, metric) for s in samples]
        ipeak = max(range(len(vals)), key=vals.__getitem__)
        trend = None
        step_vals = [getattr(s, metric) for s in self.steps if getattr(s, metric) is not None]
        if len(step_vals) >= 3:
            slope = _theil_sen(step_vals)
            diffs = [b - a for a, b in zip(step_vals, step_vals[1:])]
            frac = sum(d > 0 for d in diffs) / len(diffs)
            growth = step_vals[-1] - step_vals[0]
            trend = Trend(slope, growth, len(step_vals), frac,
                          slope >= parse_bytes(min_slope) and growth >= parse_bytes(min_growth)
                          and frac >= 0.6)
        med = statistics.median(vals)
        mad = statistics.median(abs(v - med) for v in vals)
        thr = med + max(spike_factor * mad, parse_bytes(min_spike))
        spikes, in_spike = [], False
        for s, v in zip(samples, vals):
            if v > thr and not in_spike:
                spikes.append({"t": s.t, "value": v, "phase": s.phase})
            in_spike = v > thr
        phases: dict[str, dict] = {}
        for s, v in zip(samples, vals):
            if s.phase is not None:
                p = phases.setdefault(s.phase, {"peak": v, "samples": 0})
                p["peak"] = max(p["peak"], v)
                p["samples"] += 1
        return Analysis(metric, vals[ipeak], samples[ipeak].t, samples[ipeak].phase, vals[0],
                        vals[-1], trend, spikes, phases, int(thr))

    # export -----------------------------------------------------------------------
    def to_dict(self, analysis: Analysis | None = None) -> dict:
        """Samples, steps, phases and their :meth:`analyze` (or ``analysis``, made from the
        same samples): what :meth:`to_json` writes and :meth:`plot` draws. Stop the tracker
        first for a JSON, a plot and a printed analysis that show the same peak."""
        with self._lock:
            samples = [asdict(s) for s in self.samples]
        out = {"device": self.device, "interval": self.interval, "samples": samples,
               "steps": [asdict(s) for s in self.steps],
               "phases": [{"name": n, "start": a, "end": b} for n, a, b in self.phase_spans]}
        if analysis is None:
            with contextlib.suppress(ValueError):
                analysis = self.analyze()
        if analysis is not None:
            out["analysis"] = asdict(analysis)
        return out

    def to_json(self, path: str | Path, data: dict | None = None) -> Path:
        """Write :meth:`to_dict` (or ``data``, one taken before) as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict() if data is None else data, indent=1))
        return path

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            samples = list(self.samples)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t", *FIELDS, "phase", "step"])
            for s in samples:
                w.writerow([f"{s.t:.6f}", *("" if getattr(s, k) is None else getattr(s, k) for k in FIELDS),
                            s.phase or "", s.step])
        return path

    # display ----------------------------------------------------------------------
    def __repr__(self) -> str:
        with self._lock:
            samples, steps = list(self.samples), len(self.steps)
        state = "running" if self.running else "stopped"
        if not samples:
            return f"<MemoryTracker {self.device}, {state}: no samples>"
        metric = self.metric()
        peak = max((getattr(s, metric) for s in samples if getattr(s, metric) is not None), default=None)
        return (f"<MemoryTracker {self.device}, {state}: {metric} peak {format_bytes(peak, digits=1)}, "
                f"{len(samples)} samples over {samples[-1].t:.2f}s, {steps} steps, "
                f"{len({name for name, _, _ in self.phase_spans})} phases>")

    def _repr_html_(self) -> str:
        """The table of :meth:`analyze`, under the tracker's state."""
        try:
            analysis = self.analyze()
        except ValueError:  # nothing sampled yet
            return html_table(repr(self), [], [])
        title, header, rows, footer = analysis.table()
        return html_table(f"memory on {self.device}, {title}", header, rows,
                          [f"{len(self.samples)} samples every {self.interval}s, {len(self.steps)} steps", *footer])

    def plot(self, path: str | Path | None = None, title: str | None = None, data: dict | None = None, *,
             limit: Any = None):
        """A matplotlib Figure of the timeline (MiB over seconds): phases shaded, steps
        ticked, the peak of :meth:`analyze` marked and its spike threshold drawn, and
        ``limit`` (a size, e.g. a budget) as a line.
        Drawn from :meth:`to_dict` (or ``data``, one taken before: see :func:`plot_series`).
        With ``path`` the figure is saved there and the path returned instead (what the
        pytest plugin does). Needs matplotlib (``pip install 'memwarden[plot]'``)."""
        from memwarden._plot import figure

        data = self.to_dict() if data is None else data
        fig = figure(10, 4.5)
        ax = fig.add_subplot()
        for name, (ts, vs) in plot_series(data).items():
            ax.plot(ts, [v / 2**20 for v in vs], label=name, linewidth=1.2)
        colors = ["#e8f0fe", "#fde8e8", "#e8fde9", "#fdf6e8", "#f0e8fd"]
        spans = [(p["name"], p["start"], p["end"]) for p in data["phases"]]
        names = sorted({n for n, _, _ in spans})
        end_t = data["samples"][-1]["t"] if data["samples"] else 0.0
        for n, a, b in spans:
            ax.axvspan(a, b if b is not None else end_t, color=colors[names.index(n) % len(colors)],
                       alpha=0.8, zorder=0)
        for i, n in enumerate(names):
            ax.plot([], [], color=colors[i % len(colors)], linewidth=8, label=f"phase {n}")
        for s in data["steps"]:
            ax.axvline(s["t"], color="grey", linewidth=0.4, alpha=0.5, zorder=0)
        an = data.get("analysis")
        if an is not None:
            right_half = an["peak_t"] > end_t / 2  # the label on the side with room
            ax.annotate(f"peak {format_bytes(an['peak'], digits=1)}", (an["peak_t"], an["peak"] / 2**20),
                        textcoords="offset points", xytext=(-5 if right_half else 5, 5), fontsize=8,
                        ha="right" if right_half else "left")
            if an.get("spike_threshold") is not None:  # JSON of older versions has none
                ax.axhline(an["spike_threshold"] / 2**20, color="#e8a33d", linestyle="--", linewidth=0.8,
                           label=f"{an['metric']} spike threshold")
        if limit is not None:
            limit = parse_bytes(limit, "limit")
            ax.axhline(limit / 2**20, color="#d62728", linestyle="--", linewidth=1, label=f"limit {format_bytes(limit)}")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax.set_title(title or f"memory on {self.device}")
        ax.legend(loc="upper left", fontsize=8, bbox_to_anchor=(1.0, 1.0))  # beside the lines, not on them
        ax.grid(alpha=0.3)
        if path is None:
            return fig
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path


def plot_series(data: dict) -> dict[str, tuple[list[float], list[int]]]:
    """The lines :meth:`MemoryTracker.plot` draws from ``data`` (a :meth:`~MemoryTracker.to_dict`
    or its JSON): ``{field: (seconds, bytes)}`` for each field every sample has."""
    samples = data["samples"]
    ts = [s["t"] for s in samples]
    return {k: (ts, [s[k] for s in samples]) for k in FIELDS
            if samples and all(s[k] is not None for s in samples)}
