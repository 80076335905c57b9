"""Leak check: memory before and after a piece of code, through several sources.

*Precise* sources decide: the allocator's ``allocated_bytes.all.current`` (memwarden's
allocator, or PyTorch's on CUDA) and a census of live tensor storages. *Noisy* sources
(process RSS on the host, the driver's used memory on CUDA) are reported next to them and,
by default, can only warn: an ``import`` or a library cache also grows them. With
``noisy="fail"`` they fail too.

After the code ran, a growth at or above the warn threshold is re-measured after a full
:func:`reset_memory` up to ``retries`` times; the last measurement decides. A leak names
the tensors still alive and what holds them (:func:`describe_holders`).
"""
from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _sources as src
from ._holders import describe_holders
from ._reset import collect_garbage, reset_memory
from memwarden._table import format_table
from memwarden._units import format_bytes, parse_bytes

__all__ = ["LeakChecker", "LeakResult", "SourceReading", "MemoryLeakError"]

DEFAULT_FAIL = 100 * 2**20
DEFAULT_WARN = 10 * 2**20
DEFAULT_RSS_NOISE = 32 * 2**20
DEFAULT_DRIVER_NOISE = 8 * 2**20
_INDEX = re.compile(r"\[\d+\]")     # list and tuple positions in a holder's name


class MemoryLeakError(AssertionError):
    """Raised by :meth:`LeakChecker.check` (``raise_on_fail=True``) and ``leak_check``."""

    def __init__(self, result: "LeakResult"):
        super().__init__(result.format())
        self.result = result


@dataclass
class _Source:
    name: str
    precise: bool
    read: Callable[[], int | None]
    noise_floor: int = 0


@dataclass
class SourceReading:
    name: str
    precise: bool
    before: int
    after: int
    exempt: int = 0
    noise_floor: int = 0

    @property
    def growth(self) -> int:
        return self.after - self.before - self.exempt


@dataclass
class LeakResult:
    device: str
    verdict: str                       # "ok" | "warn" | "fail"
    fail_threshold: int
    warn_threshold: int
    readings: list[SourceReading]
    attempts: int
    new_tensors: list[tuple[str, int, list[str]]] = field(default_factory=list)
    new_blocks: list[Any] = field(default_factory=list)
    label: str = ""

    @property
    def leaked(self) -> int:
        """Growth of the deciding sources (precise ones; noisy ones when none is precise)."""
        pool = [r for r in self.readings if r.precise] or self.readings
        return max((r.growth for r in pool), default=0)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def summary(self) -> str:
        what = f"{self.label} " if self.label else ""
        if self.verdict == "ok":
            return f"{what}no leak on {self.device}"
        thr = self.fail_threshold if self.verdict == "fail" else self.warn_threshold
        over = [r for r in self.readings if r.growth >= thr]
        r = max([r for r in over if r.precise] or over or self.readings, key=lambda r: r.growth)
        exact = f"{r.growth} bytes; " if r.precise else ""    # a precise source counts bytes
        return (f"{what}leaked {format_bytes(r.growth, digits=1)} on {self.device} according to {r.name} "
                f"({exact}{self.verdict} threshold {format_bytes(thr, digits=1)})")

    def format(self, top: int = 8) -> str:
        rows = []
        for r in self.readings:
            notes = [] if r.precise else [f"noisy; ignores < {format_bytes(r.noise_floor, digits=1)}"
                                          if r.noise_floor else "noisy"]
            if r.exempt:
                notes.append(f"{format_bytes(r.exempt, digits=1)} exempt: broader-scoped fixtures")
            rows.append([r.name, format_bytes(r.before, digits=1), format_bytes(r.after, digits=1),
                         format_bytes(r.growth, signed=True, digits=1), "; ".join(notes)])
        lines = [f"memwarden leak check: {self.summary()}",
                 f"  measured {self.attempts} time(s), with a full cleanup before each retry",
                 format_table("", ["source", "before", "after", "growth", "note"], rows)]
        if self.new_tensors:
            total = sum(n for _, n, _ in self.new_tensors)
            lines.append(f"  live tensors created during the test and still alive "
                         f"({len(self.new_tensors)}, {format_bytes(total, digits=1)}):")
            groups: dict[tuple, list] = {}     # alike tensors in one container: one line
            for desc, n, holders in self.new_tensors:
                key = (desc, n, tuple(_INDEX.sub("[*]", h) for h in holders))
                groups.setdefault(key, []).append(holders)
            for i, ((desc, n, alike), members) in enumerate(groups.items()):
                if i == top:
                    lines.append(f"    ... {len(groups) - top} more groups")
                    break
                count = len(members)
                holders = members[0] if count == 1 else alike
                held = f"  held by {'; '.join(holders)}" if holders else ""
                mult = f"{count} x " if count > 1 else ""
                lines.append(f"    {format_bytes(n * count, digits=1):>10}  {mult}{desc}{held}")
        if self.new_blocks:
            total = sum(b.size for b in self.new_blocks)
            lines.append(f"  live allocator blocks created during the test "
                         f"({len(self.new_blocks)}, {format_bytes(total, digits=1)}):")
            for b in self.new_blocks[:top]:
                where = b.where()
                lines.append(f"    {format_bytes(b.size, digits=1):>10}  at 0x{b.address:x}"
                             + (f"  allocated at {where}" if where else "  (no stack recorded)"))
            if len(self.new_blocks) > top:
                lines.append(f"    ... {len(self.new_blocks) - top} more")
        return "\n".join(lines)


class LeakChecker:
    """Measure before (:meth:`start`) and after (:meth:`check`) some code.

    ``with LeakChecker("cpu", fail="64 MiB") as lc: ...`` raises :class:`MemoryLeakError`
    on exit when the code leaked at least ``fail``.
    """

    def __init__(self, device: Any = None, *, fail: Any = DEFAULT_FAIL, warn: Any = DEFAULT_WARN,
                 retries: int = 3, noisy: str = "warn", rss_noise: Any = DEFAULT_RSS_NOISE,
                 driver_noise: Any = DEFAULT_DRIVER_NOISE, census: bool = True, label: str = ""):
        if noisy not in ("warn", "fail", "ignore"):
            raise ValueError(f"noisy must be 'warn', 'fail' or 'ignore', got {noisy!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.device = src.resolve_device(device)
        self.fail = parse_bytes(fail)
        self.warn = min(parse_bytes(warn), self.fail)
        self.retries = retries
        self.noisy = noisy
        self.census = census
        self.label = label
        self._sources = self._make_sources(parse_bytes(rss_noise), parse_bytes(driver_noise))
        self._before: dict[str, int] = {}
        self._exempt: dict[str, int] = {}
        self._census_before: set[int] = set()
        self._blocks_before: set[int] | None = None
        self.result: LeakResult | None = None
        self._last_census: dict = {}

    def _make_sources(self, rss_noise: int, driver_noise: int) -> list[_Source]:
        dev = self.device
        out: list[_Source] = []
        if src.allocator_stats(dev) is not None:
            name = "memwarden-alloc" if src.alloc_backend(dev) is not None else "torch-alloc"
            out.append(_Source(name, True, lambda: src.allocated_bytes(dev)))
        if self.census:
            out.append(_Source("torch-tensors", True, self._census_total))
        if src.device_type(dev) == "cuda":
            out.append(_Source("driver-used", False, lambda: src.device_used_bytes(dev), driver_noise))
        elif src.alloc_backend(dev) is None:   # memwarden's host allocator counts every CPU tensor
            out.append(_Source("host-rss", False, src.host_rss, rss_noise))
        return out

    def _census_total(self) -> int:
        self._last_census = src.tensor_census(self.device)
        return sum(t.nbytes for t in self._last_census.values())

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self._sources]

    def read(self) -> dict[str, int]:
        """One reading of every source (after gc and malloc_trim)."""
        collect_garbage(2)
        src.malloc_trim()
        return {s.name: int(s.read() or 0) for s in self._sources}

    def start(self) -> "LeakChecker":
        self._before = self.read()
        self._exempt = {}
        if self.census:
            self._census_before = set(self._last_census)
        blocks = src.live_blocks(self.device) if src.allocator_stats(self.device) is not None else None
        self._blocks_before = set(blocks) if blocks is not None else None
        return self

    def exempt(self, amounts: dict[str, int]) -> None:
        """Do not count ``amounts`` (per source) as leaked, e.g. memory that a broader-scoped
        fixture set up during the test keeps on purpose."""
        for k, v in amounts.items():
            self._exempt[k] = self._exempt.get(k, 0) + int(v)

    def _verdict(self, readings: list[SourceReading]) -> str:
        verdict = "ok"
        for r in readings:
            g = r.growth
            if r.precise:
                if g >= self.fail:
                    return "fail"
                if g >= self.warn:
                    verdict = "warn"
            elif self.noisy != "ignore" and g >= max(self.warn, r.noise_floor):
                if self.noisy == "fail" and g >= max(self.fail, r.noise_floor):
                    return "fail"
                verdict = "warn"
        return verdict

    def check(self, *, raise_on_fail: bool = False) -> LeakResult:
        if not self._before:
            raise RuntimeError("LeakChecker.check() called before start()")
        attempts = 0
        while True:
            attempts += 1
            after = self.read()
            readings = [SourceReading(s.name, s.precise, self._before[s.name], after[s.name],
                                      self._exempt.get(s.name, 0), s.noise_floor)
                        for s in self._sources]
            verdict = self._verdict(readings)
            if verdict == "ok" or attempts > self.retries:
                break
            reset_memory(self.device)
        result = LeakResult(self.device, verdict, self.fail, self.warn, readings, attempts,
                            label=self.label)
        if verdict != "ok":
            self._attribute(result)
        self.result = result
        if raise_on_fail and verdict == "fail":
            raise MemoryLeakError(result)
        return result

    def _attribute(self, result: LeakResult) -> None:
        if self.census:
            new = [t for k, t in self._last_census.items() if k not in self._census_before]
            new.sort(key=lambda t: -t.nbytes)
            objs = [t.ref() if t.ref is not None else None for t in new[:8]]
            holders = describe_holders(objs)
            del objs
            result.new_tensors.extend((t.desc, t.nbytes, h) for t, h in zip(new, holders))
            result.new_tensors.extend((t.desc, t.nbytes, []) for t in new[8:])
        if self._blocks_before is not None:
            blocks = src.live_blocks(self.device) or {}
            result.new_blocks = sorted((b for a, b in blocks.items() if a not in self._blocks_before),
                                       key=lambda b: -b.size)
        gc.collect(0)

    def __enter__(self) -> "LeakChecker":
        return self.start()

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.check(raise_on_fail=True)
