"""Degradation: five levels (low, medium, high, critical, emergency) chosen from the memory
pressure the monitor reports, with hysteresis so a level does not flap; each level maps to
a :class:`DegradationPolicy` (fewer output tokens, capped ``top_p`` and ``temperature``,
smaller batches, refusing new sessions) that admission and the server read. Pure policy:
it reads measurements, it does not take them.

Pressure is the fraction of the memory budget in use. A level is entered when pressure
reaches its lower threshold (``pressure >= threshold``; defaults 0.70 medium, 0.80 high,
0.85 critical, 0.90 emergency) and left downwards only once pressure falls below that
threshold minus ``hysteresis``. Pressure above 1.0 (use beyond the budget) is emergency.

    deg = Degradation()
    deg.update(0.82)                       # Level.HIGH
    deg.apply(max_tokens=100, temperature=1.2, top_p=1.0)
    # Applied(max_tokens=70, temperature=1.0, top_p=0.9, degraded=True, level='high')

May import: the standard library and the bottom layers only (``_units``, ``_checks``,
``_devices``, ``_table``). Never torch, :mod:`memwarden.serve` or :mod:`memwarden.cli`.
"""
from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Union

from memwarden._checks import integer

__all__ = [
    "Level", "DegradationPolicy", "Applied", "Degradation",
    "DEFAULT_THRESHOLDS", "DEFAULT_POLICIES",
]


class Level(enum.IntEnum):
    """Degradation levels, ordered by pressure."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3
    EMERGENCY = 4

    @property
    def label(self) -> str:
        """``"low"``, ``"medium"``, ... (metric labels, config keys, response fields)."""
        return self.name.lower()

    @classmethod
    def parse(cls, key: Any, name: str) -> Level:
        """A :class:`Level` from itself or its label; ``ValueError`` naming ``name`` otherwise."""
        if isinstance(key, Level):
            return key
        if isinstance(key, str) and key.upper() in cls.__members__:
            return cls[key.upper()]
        labels = ", ".join(repr(level.label) for level in cls)
        raise ValueError(f"{name}: unknown level {key!r}, expected one of {labels}")


def _fraction(value: Any, name: str, *, low: float, high: float, low_open: bool,
              high_open: bool = False) -> float:
    """``value`` as a float between ``low`` and ``high``, each end open or closed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    above_low = value > low if low_open else value >= low
    below_high = value < high if high_open else value <= high
    if not (above_low and below_high):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DegradationPolicy:
    """What a level does to requests.

    ``max_tokens_factor`` scales a request's ``max_tokens``; ``top_p_cap`` and
    ``temperature_cap`` bound sampling (``None``: no cap); ``max_batch_size_factor``
    scales the batch size the scheduler may form; ``refuse_new_sessions`` tells admission
    to turn away requests for sessions it does not know yet.
    """

    max_tokens_factor: float = 1.0
    top_p_cap: float = 1.0
    temperature_cap: float | None = None
    max_batch_size_factor: float = 1.0
    refuse_new_sessions: bool = False

    def __post_init__(self) -> None:
        _fraction(self.max_tokens_factor, "max_tokens_factor", low=0.0, high=1.0, low_open=True)
        _fraction(self.top_p_cap, "top_p_cap", low=0.0, high=1.0, low_open=True)
        _fraction(self.max_batch_size_factor, "max_batch_size_factor", low=0.0, high=1.0, low_open=True)
        if self.temperature_cap is not None:
            _fraction(self.temperature_cap, "temperature_cap", low=0.0, high=math.inf, low_open=False,
                      high_open=True)
        if not isinstance(self.refuse_new_sessions, bool):
            raise ValueError(f"refuse_new_sessions must be a bool, got {self.refuse_new_sessions!r}")

    def max_batch_size(self, batch_size: int) -> int:
        """The batch size allowed at this level for a configured ``batch_size`` (at least 1)."""
        batch_size = integer(batch_size, "batch_size")
        return max(1, _scale(batch_size, self.max_batch_size_factor))


def _scale(count: int, factor: float) -> int:
    # The factor as written, not its binary neighbour: 100 x 0.29 is 29, not 28.
    return math.floor(count * Fraction(repr(factor)))


# Read-only, so no caller changes the defaults of every other instance.
DEFAULT_THRESHOLDS: Mapping[str, float] = MappingProxyType(
    {"medium": 0.70, "high": 0.80, "critical": 0.85, "emergency": 0.90})

DEFAULT_POLICIES: Mapping[Level, DegradationPolicy] = MappingProxyType({
    Level.LOW: DegradationPolicy(1.0, 1.0, None, 1.0),
    Level.MEDIUM: DegradationPolicy(0.9, 0.95, None, 1.0),
    Level.HIGH: DegradationPolicy(0.7, 0.9, 1.0, 0.75),
    Level.CRITICAL: DegradationPolicy(0.5, 0.85, 0.8, 0.5),
    Level.EMERGENCY: DegradationPolicy(0.3, 0.8, 0.7, 0.25, refuse_new_sessions=True),
})


@dataclass(frozen=True)
class Applied:
    """A request's sampling parameters after the level's policy; ``degraded`` says whether
    any of them changed, so the response can tell the client."""

    max_tokens: int
    temperature: float | None
    top_p: float | None
    degraded: bool
    level: str


ChangeCallback = Callable[[Level, Level, float], Any]


class Degradation:
    """The current degradation level, moved by :meth:`update` with hysteresis.

    ``thresholds`` overrides the lower thresholds of some levels (keys: labels or
    :class:`Level`; ``low`` has none); the result must increase strictly with the level
    and lie in ``(0, 1)``. ``policies`` overrides the policy of some levels.
    ``on_change`` (a callable or a list of them) is called as ``fn(old, new, pressure)``
    after every change of level, outside the lock; append to :attr:`on_change` to add more.
    """

    def __init__(
        self,
        thresholds: Mapping[str | Level, float] | None = None,
        hysteresis: float = 0.02,
        policies: Mapping[str | Level, DegradationPolicy] | None = None,
        on_change: Union[ChangeCallback, Iterable[ChangeCallback], None] = None,
    ) -> None:
        self._thresholds = self._parse_thresholds(thresholds or {})
        self.hysteresis = _fraction(hysteresis, "hysteresis", low=0.0, high=1.0, low_open=False)
        self._policies = dict(DEFAULT_POLICIES)
        for key, policy in (policies or {}).items():
            level = Level.parse(key, "policies")
            if not isinstance(policy, DegradationPolicy):
                raise ValueError(f"policies[{level.label!r}] must be a DegradationPolicy, got {policy!r}")
            self._policies[level] = policy
        if on_change is None:
            self.on_change: list[ChangeCallback] = []
        elif callable(on_change):
            self.on_change = [on_change]
        else:
            self.on_change = list(on_change)
        self._level = Level.LOW
        self._transitions = {level: 0 for level in Level}
        self._lock = threading.Lock()

    @staticmethod
    def _parse_thresholds(overrides: Mapping[str | Level, float]) -> tuple[float, ...]:
        """Lower thresholds indexed by level (``LOW``'s is 0.0), validated."""
        merged = {Level.parse(key, "thresholds"): value for key, value in DEFAULT_THRESHOLDS.items()}
        for key, value in overrides.items():
            level = Level.parse(key, "thresholds")
            if level is Level.LOW:
                raise ValueError("thresholds['low']: the lowest level has no threshold (it starts at 0)")
            merged[level] = _fraction(value, f"thresholds[{level.label!r}]", low=0.0, high=1.0,
                                      low_open=True, high_open=True)
        above_low = list(Level)[1:]
        for lower, upper in zip(above_low, above_low[1:]):
            if not merged[lower] < merged[upper]:
                raise ValueError(
                    f"thresholds[{upper.label!r}] = {merged[upper]!r} must be above "
                    f"thresholds[{lower.label!r}] = {merged[lower]!r} (thresholds increase with the level)")
        return (0.0, *(merged[level] for level in above_low))

    @property
    def thresholds(self) -> dict[str, float]:
        """Lower threshold of each level above ``low``, by label."""
        return {level.label: self._thresholds[level] for level in list(Level)[1:]}

    @property
    def level(self) -> Level:
        return self._level

    @property
    def policy(self) -> DegradationPolicy:
        return self._policies[self._level]

    def policy_for(self, level: Level | str) -> DegradationPolicy:
        return self._policies[Level.parse(level, "level")]

    @property
    def transitions(self) -> dict[Level, int]:
        """How many times each level was entered (a copy)."""
        with self._lock:
            return dict(self._transitions)

    def level_for(self, pressure: float) -> Level:
        """The level of ``pressure`` without hysteresis: the highest whose threshold it reaches."""
        pressure = self._check_pressure(pressure)
        return self._raw_level(pressure)

    def _raw_level(self, pressure: float) -> Level:
        reached = [level for level in Level if pressure >= self._thresholds[level]]
        return reached[-1]

    @staticmethod
    def _check_pressure(pressure: Any) -> float:
        if isinstance(pressure, bool) or not isinstance(pressure, (int, float)) or not math.isfinite(pressure):
            raise ValueError(f"pressure must be a finite number, got {pressure!r}")
        if pressure < 0:
            raise ValueError(f"pressure must not be negative, got {pressure!r}")
        return float(pressure)

    def update(self, pressure: float) -> Level:
        """Move to the level for ``pressure`` and return it.

        Upwards at once, to the level whose threshold ``pressure`` reaches. Downwards, the
        current level holds while ``pressure >= its threshold - hysteresis``; below that
        it drops to the highest level whose band (threshold minus hysteresis) still holds
        ``pressure``, so falling fast skips levels and falling slowly steps through them.
        """
        pressure = self._check_pressure(pressure)
        with self._lock:
            old = self._level
            new = self._raw_level(pressure)
            if new < old:
                held = [level for level in Level
                        if new <= level <= old and pressure >= self._thresholds[level] - self.hysteresis]
                new = held[-1]
            if new == old:
                return old
            self._level = new
            self._transitions[new] += 1
        for callback in list(self.on_change):
            callback(old, new, pressure)
        return new

    def apply(self, max_tokens: int, temperature: float | None = None, top_p: float | None = None) -> Applied:
        """A request's ``max_tokens``, ``temperature`` and ``top_p`` under the current policy.

        ``max_tokens`` is scaled down (never below 1 for a request asking at least 1);
        ``temperature`` and ``top_p`` are capped. A parameter the request left out
        (``None``) becomes the cap, since the server's default may exceed it; with no cap
        it stays ``None``.
        """
        max_tokens = integer(max_tokens, "max_tokens", minimum=0)
        if temperature is not None:
            temperature = _fraction(temperature, "temperature", low=0.0, high=math.inf, low_open=False,
                                    high_open=True)
        if top_p is not None:
            top_p = _fraction(top_p, "top_p", low=0.0, high=1.0, low_open=False)
        level = self._level
        policy = self._policies[level]

        tokens = max(1, _scale(max_tokens, policy.max_tokens_factor)) if max_tokens else 0
        new_temperature = temperature
        if policy.temperature_cap is not None:
            new_temperature = policy.temperature_cap if temperature is None else min(temperature, policy.temperature_cap)
        new_top_p = top_p
        if policy.top_p_cap < 1.0:
            new_top_p = policy.top_p_cap if top_p is None else min(top_p, policy.top_p_cap)
        degraded = (tokens, new_temperature, new_top_p) != (max_tokens, temperature, top_p)
        return Applied(tokens, new_temperature, new_top_p, degraded, level.label)
