"""Configuration of the controller and the server: one tree of dataclasses, one section each
(``allocator``, ``admission``, ``sessions``, ``degradation``, ``monitor``, ``server``),
loaded in layers, each over the one before::

    defaults  <-  TOML file  <-  MEMWARDEN_<SECTION>_<KEY> variables  <-  overrides (CLI flags)

:meth:`MemwardenConfig.load` reads them and records where every value came from
(:meth:`~MemwardenConfig.sources`, :meth:`~MemwardenConfig.describe`). Values are parsed
to the key's type: sizes go through :func:`memwarden._units.parse_bytes` (so ``"512MiB"``;
a bare ``"512"`` is refused), lists of fractions and of names are TOML arrays or comma-separated text,
booleans are ``true/false/1/0/yes/no/on/off``, and a key that may be unset takes ``""``
or ``"none"`` for ``None``. An unknown section or key, or a value that does not parse or
is out of range, raises :class:`ConfigError` naming the key and its source, e.g.
``MEMWARDEN_SESSIONS_IDLE_TIMEOUT: ...`` or ``serve.toml [sessions] idle_timeout: ...``.

Environment variables are read only for the sections above: ``MEMWARDEN_CUDA``,
``MEMWARDEN_FUZZ_LONG`` and other build and test switches share the prefix and are left
alone, while a misspelt key in a known section (``MEMWARDEN_SESSIONS_IDLE_TIMOUT``) is an
error. Binding the server to anything but a loopback address needs
``server.allow_remote = true``: the API has no authentication.

May import: the bottom layers only (``_units``, ``_table``). Never :mod:`memwarden.serve`
or :mod:`memwarden.cli` (they read this, not the reverse).
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from memwarden._table import format_table
from memwarden._units import format_bytes, parse_bytes

__all__ = ["ConfigError", "MemwardenConfig", "AllocatorConfig", "AdmissionConfig",
           "SessionsConfig", "DegradationConfig", "MonitorConfig", "ServerConfig",
           "ADMISSION_POLICIES", "SWAP_POLICIES"]

ADMISSION_POLICIES = ("memwarden", "reserve", "optimistic", "admit_all", "lookahead")
SWAP_POLICIES = ("memwarden", "ollama", "lru", "never")  # controller.models.SWAP_POLICIES, by name
ENV_PREFIX = "MEMWARDEN_"


class ConfigError(ValueError):
    """A configuration key or value memwarden refuses; the message names both and the source."""


# ---- options: a key's kind, whether it may be unset, and its range -------------------------

Check = Callable[[Any], "str | None"]  # a problem with a parsed value, or None


def _option(default: Any, kind: str, *, optional: bool = False, check: Check | None = None) -> Any:
    """A dataclass field holding one key. ``kind``: int, float, bool, str, size (bytes),
    fractions (a tuple of floats) or names (a tuple of non-empty strings)."""
    return field(default=default, metadata={"kind": kind, "optional": optional, "check": check})


def _at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low}, got {v!r}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be positive, got {v!r}"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else f"must be a fraction in (0, 1], got {v!r}"


def _reserve_fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else f"must be a fraction in [0, 1), got {v!r}"


def _increasing_fractions(vs: tuple[float, ...]) -> str | None:
    if not vs or not all(0 < v <= 1 for v in vs) or any(a >= b for a, b in zip(vs, vs[1:])):
        return f"must be increasing fractions in (0, 1], got {list(vs)}"
    return None


def _decreasing_factors(vs: tuple[float, ...]) -> str | None:
    if not vs or not all(0 < v <= 1 for v in vs) or any(a < b for a, b in zip(vs, vs[1:])):
        return f"must be non-increasing fractions in (0, 1], got {list(vs)}"
    return None


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else f"must be a TCP port in 0..65535, got {v}"


def _policy(v: str) -> str | None:
    return None if v in ADMISSION_POLICIES else \
        f"must be one of {', '.join(ADMISSION_POLICIES)}, got {v!r}"


def _swap_policy(v: str) -> str | None:
    return None if v in SWAP_POLICIES else f"must be one of {', '.join(SWAP_POLICIES)}, got {v!r}"


def _distinct(vs: tuple[str, ...]) -> str | None:
    return None if len(set(vs)) == len(vs) else f"must not repeat a name, got {list(vs)}"


def _url(v: str) -> str | None:
    return None if v.startswith(("http://", "https://")) else f"must be an http(s) URL, got {v!r}"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


# ---- the sections ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AllocatorConfig:
    """memwarden's allocator (:mod:`memwarden.alloc`): pool limits (``None``: none) and the
    options of ``memwarden.alloc.configure``."""

    cpu_memory_limit: int | None = _option(None, "size", optional=True)
    cuda_memory_limit: int | None = _option(None, "size", optional=True)
    max_split_size: int | None = _option(None, "size", optional=True)
    gc_threshold: float = _option(0.0, "float", check=_reserve_fraction)


@dataclass(frozen=True)
class AdmissionConfig:
    """How requests are admitted: the policy, the wait queue, and routing of long prompts."""

    policy: str = _option("memwarden", "str", check=_policy)
    queue_limit: int = _option(64, "int", check=_at_least(0))
    queue_timeout: float = _option(30.0, "float", check=_positive)
    route_above_tokens: int | None = _option(None, "int", optional=True, check=_at_least(1))
    upstream_url: str | None = _option(None, "str", optional=True, check=_url)


@dataclass(frozen=True)
class SessionsConfig:
    """KV budgets per session and in all, and how long an idle session is kept (seconds)."""

    per_session_limit: int = _option(parse_bytes("512MiB"), "size", check=_positive)
    global_limit: int = _option(parse_bytes("20GiB"), "size", check=_positive)
    idle_timeout: float = _option(300.0, "float", check=_positive)


@dataclass(frozen=True)
class DegradationConfig:
    """Pressure thresholds of the degradation levels above normal, the hysteresis below
    each, and the ``max_tokens`` factor of every level (normal first: one more than
    thresholds)."""

    thresholds: tuple[float, ...] = _option((0.70, 0.80, 0.85, 0.90), "fractions",
                                            check=_increasing_fractions)
    hysteresis: float = _option(0.02, "float", check=_reserve_fraction)
    enabled: bool = _option(True, "bool")  # false: every request as asked, whatever the pressure
    max_tokens_factors: tuple[float, ...] = _option((1.0, 0.9, 0.7, 0.5, 0.3), "fractions",
                                                    check=_decreasing_factors)


@dataclass(frozen=True)
class MonitorConfig:
    """The memory monitor (:class:`memwarden.controller.monitor.MemoryMonitor`)."""

    interval: float = _option(1.0, "float", check=_positive)
    warning: float = _option(0.75, "float", check=_fraction)
    critical: float = _option(0.85, "float", check=_fraction)
    emergency: float = _option(0.95, "float", check=_fraction)
    spike_reserve: float = _option(0.10, "float", check=_reserve_fraction)
    history: int = _option(1024, "int", check=_at_least(1))

    @property
    def thresholds(self) -> tuple[float, float, float]:
        return self.warning, self.critical, self.emergency


@dataclass(frozen=True)
class ServerConfig:
    """``memwarden serve``: where it listens, its memory budget and its model or models, or
    the upstream engine it admits requests for (``upstream``; timeouts and the poll interval
    in seconds)."""

    host: str = _option("127.0.0.1", "str", check=_non_empty)
    port: int = _option(8000, "int", check=_port)
    max_memory: int | None = _option(None, "size", optional=True)
    model: str | None = _option(None, "str", optional=True, check=_non_empty)
    allow_remote: bool = _option(False, "bool")
    max_concurrency: int = _option(4, "int", check=_at_least(1))  # requests generating at once
    # upstream mode (memwarden.serve.gateway): proxy generation to an OpenAI-compatible engine
    upstream: str | None = _option(None, "str", optional=True, check=_url)
    upstream_model: str | None = _option(None, "str", optional=True, check=_non_empty)  # prices its KV
    upstream_poll_interval: float = _option(1.0, "float", check=_positive)  # seconds between /metrics reads
    upstream_timeout: float = _option(300.0, "float", check=_positive)  # for a response, or between chunks
    upstream_connect_timeout: float = _option(5.0, "float", check=_positive)  # also bounds probes
    # lookahead: count whole answers by the upstream's pace rather than streaming them (cheaper, estimated)
    upstream_pace: bool = _option(False, "bool")

    # Several models (``memwarden serve --model A --model B``): with more than one,
    # ``max_memory`` is the device budget for their weights and ``kv_memory`` the KV budget;
    # ``device_limit`` makes memwarden's host allocator, so limited, stand in for the device
    # on a CPU (what a real device's out-of-memory error would be).
    models: tuple[str, ...] = _option((), "names", check=_distinct)
    swap_policy: str = _option("memwarden", "str", check=_swap_policy)
    kv_memory: int | None = _option(None, "size", optional=True)
    device_limit: int | None = _option(None, "size", optional=True)
    host_memory: int | None = _option(None, "size", optional=True)  # for parked weights (None: no bound)
    load_timeout: float = _option(30.0, "float", check=_positive)  # how long a request waits for its model
    min_residency: float = _option(30.0, "float", check=_at_least(0))  # memwarden: seconds safe after a load
    demand_half_life: float = _option(300.0, "float", check=_positive)  # memwarden: seconds
    keep_alive: float = _option(300.0, "float", check=_at_least(0))  # ollama: idle seconds before unloading
    max_loaded: int = _option(3, "int", check=_at_least(1))  # ollama: models on the device at most


# ---- parsing --------------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _from_native(kind: str, optional: bool, value: Any, key: str) -> Any:
    """A TOML value (or one given in code) as ``kind``; raises ValueError saying what is wrong."""
    if optional and (value is None or isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if kind == "size":
        return parse_bytes(value, key)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and _is_number(value) and math.isfinite(value):
        return float(value)
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "fractions" and isinstance(value, (list, tuple)) and all(
            _is_number(v) and math.isfinite(v) for v in value):
        return tuple(float(v) for v in value)
    if kind == "names" and isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.strip()
                                                                    for v in value):
        return tuple(v.strip() for v in value)
    expected = {"int": "an integer", "float": "a finite number", "bool": "true or false",
                "str": "a string", "fractions": "a list of numbers", "names": "a list of non-empty strings"}[kind]
    raise ValueError(f"expected {expected}, got {value!r}")


def _from_text(kind: str, optional: bool, text: str, key: str) -> Any:
    """An environment variable's (or CLI flag's) text as ``kind``."""
    stripped = text.strip()
    if optional and stripped.lower() in ("", "none"):
        return None
    try:
        if kind == "int":
            return int(stripped)
        if kind == "float":
            return _from_native(kind, optional, float(stripped), key)
        if kind == "fractions":
            return tuple(float(part) for part in stripped.split(","))
        if kind == "names":
            return _from_native(kind, optional, stripped.split(",") if stripped else [], key)
    except ValueError:
        expected = {"int": "an integer", "float": "a finite number",
                    "fractions": "comma-separated numbers"}[kind]
        raise ValueError(f"expected {expected}, got {text!r}") from None
    if kind == "bool":
        if stripped.lower() in _TRUE + _FALSE:
            return stripped.lower() in _TRUE
        raise ValueError(f"expected one of {'/'.join(_TRUE + _FALSE)}, got {text!r}")
    return _from_native(kind, optional, text, key)  # str and size


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the backport, when installed
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError(f"{path}: reading TOML needs Python 3.11 or the tomli package") from None
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


# ---- the tree -------------------------------------------------------------------------------

def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treat it as remote


@dataclass(frozen=True)
class MemwardenConfig:
    """The whole configuration; build it with :meth:`load`. Constructing it (or
    ``dataclasses.replace``) parses and validates every section: sizes given as strings
    become bytes, and a bad value raises :class:`ConfigError`."""

    allocator: AllocatorConfig = field(default_factory=AllocatorConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    # "section.key" -> "file PATH" | "env NAME" | "override", for the keys not left at default
    _sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for section, options in _SECTIONS.items():
            current = getattr(self, section)
            parsed = {name: self._parse(section, name, option, getattr(current, name))
                      for name, option in options.items()}
            object.__setattr__(self, section, dataclasses.replace(current, **parsed))
        self._check_together()

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: Mapping[str, str] = os.environ,
             overrides: Mapping[str, Any] | None = None) -> MemwardenConfig:
        """Defaults, then the TOML file at ``path`` (if any), then ``env``'s
        ``MEMWARDEN_<SECTION>_<KEY>`` variables, then ``overrides`` (``{"sessions.idle_timeout":
        60}``; a ``None`` value is a flag not given and is skipped; strings are parsed like
        environment variables)."""
        values: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
        sources: dict[str, str] = {}

        def put(section: str, name: str, value: Any, source: str, as_text: bool) -> None:
            option = _SECTIONS[section][name]
            if as_text:  # text gets its type here; native values are parsed with the rest
                try:
                    value = _from_text(option["kind"], option["optional"], value, f"{section}.{name}")
                except ValueError as exc:
                    raise ConfigError(f"{_locate(section, name, source)}: {exc}") from None
            values[section][name] = value
            sources[f"{section}.{name}"] = source

        if path is not None:
            path = Path(path)
            for section, table in _read_toml(path).items():
                if section not in _SECTIONS:
                    raise ConfigError(f"{path} [{section}]: unknown section; expected one of "
                                      f"{', '.join(_SECTIONS)}{_suggest(section, _SECTIONS)}")
                if not isinstance(table, dict):
                    raise ConfigError(f"{path} {section}: expected a [{section}] table, got {table!r}")
                for name, value in table.items():
                    _known(section, name, f"{path} [{section}] {name}")
                    put(section, name, value, f"file {path}", as_text=False)
        for variable, text in sorted(env.items()):
            if not variable.startswith(ENV_PREFIX):
                continue
            section, _, name = variable[len(ENV_PREFIX):].lower().partition("_")
            if section not in _SECTIONS:
                continue  # not ours: build and test switches share the prefix
            _known(section, name, variable)
            put(section, name, text, f"env {variable}", as_text=True)
        for dotted, value in (overrides or {}).items():
            section, _, name = str(dotted).partition(".")
            if section not in _SECTIONS:
                raise ConfigError(f"override {dotted!r}: unknown section {section!r}; expected "
                                  f"one of {', '.join(_SECTIONS)}{_suggest(section, _SECTIONS)}")
            _known(section, name, f"override {dotted}")
            if value is not None:
                put(section, name, value, "override", as_text=isinstance(value, str))
        sections = {section: _CLASSES[section](**given) for section, given in values.items()}
        return cls(**sections, _sources=sources)

    # ---- validation -----------------------------------------------------------------------

    def _where(self, section: str, name: str) -> str:
        return _locate(section, name, self._source(section, name))

    def _parse(self, section: str, name: str, option: dict[str, Any], value: Any) -> Any:
        try:
            parsed = _from_native(option["kind"], option["optional"], value, f"{section}.{name}")
            problem = None if parsed is None or option["check"] is None else option["check"](parsed)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            raise ConfigError(f"{self._where(section, name)}: {problem}")
        return parsed

    def _refuse(self, problem: str, *keys: str) -> None:
        where = "; ".join(self._where(*key.split(".")) for key in keys)
        raise ConfigError(f"{where}: {problem}")

    def _check_together(self) -> None:
        """Rules between keys; the error names every key involved."""
        s, d, m, srv = self.sessions, self.degradation, self.monitor, self.server
        if s.per_session_limit > s.global_limit:
            self._refuse(f"per_session_limit ({format_bytes(s.per_session_limit)}) exceeds "
                         f"global_limit ({format_bytes(s.global_limit)})",
                         "sessions.per_session_limit", "sessions.global_limit")
        if len(d.max_tokens_factors) != len(d.thresholds) + 1:
            self._refuse(f"max_tokens_factors needs one factor per level, normal included: "
                         f"{len(d.thresholds) + 1} for {len(d.thresholds)} thresholds, got "
                         f"{len(d.max_tokens_factors)}",
                         "degradation.max_tokens_factors", "degradation.thresholds")
        gaps = [b - a for a, b in zip((0.0, *d.thresholds), d.thresholds)]
        if d.hysteresis >= min(gaps):
            self._refuse(f"hysteresis ({d.hysteresis}) must be smaller than the gap below every "
                         f"threshold (the smallest is {min(gaps):.4g}), or levels overlap",
                         "degradation.hysteresis", "degradation.thresholds")
        if not m.warning < m.critical < m.emergency:
            self._refuse(f"thresholds must increase: warning {m.warning} < critical {m.critical} "
                         f"< emergency {m.emergency}",
                         "monitor.warning", "monitor.critical", "monitor.emergency")
        a = self.admission
        if (a.route_above_tokens is None) != (a.upstream_url is None):
            self._refuse("routing needs both: the prompt length to route above and the pool to route to",
                         "admission.route_above_tokens", "admission.upstream_url")
        if a.route_above_tokens is not None and a.policy != "memwarden":
            self._refuse(f"routing is a 'memwarden' policy option, not {a.policy!r}",
                         "admission.route_above_tokens", "admission.policy")
        if srv.upstream is not None and (srv.model is not None or srv.models):
            self._refuse("a server generates with its own model or proxies to an upstream, not both",
                         "server.models" if srv.models else "server.model", "server.upstream")
        if srv.upstream_model is not None and srv.upstream is None:
            self._refuse("upstream_model describes the upstream's model: set server.upstream too",
                         "server.upstream_model", "server.upstream")
        if srv.model is not None and srv.models:
            self._refuse("name one model in server.model or several in server.models, not both",
                         "server.model", "server.models")
        if not _is_loopback(srv.host) and not srv.allow_remote:
            self._refuse(f"host {srv.host!r} is not a loopback address and the API has no "
                         f"authentication; set server.allow_remote = true to serve it remotely",
                         "server.host", "server.allow_remote")

    # ---- reading it back ------------------------------------------------------------------

    def sources(self) -> dict[str, str]:
        """``{"sessions.idle_timeout": "env MEMWARDEN_SESSIONS_IDLE_TIMEOUT", ...}`` for every key:
        ``"default"``, ``"file PATH"``, ``"env NAME"``, ``"override"`` (or ``"given"`` for a value
        set in code)."""
        return {f"{section}.{name}": self._source(section, name)
                for section, options in _SECTIONS.items() for name in options}

    def _source(self, section: str, name: str) -> str:
        source = self._sources.get(f"{section}.{name}")
        if source is not None:
            return source
        given = getattr(getattr(self, section), name)
        return "default" if given == _SECTIONS[section][name]["default"] else "given"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}``; sizes in bytes, lists of fractions as lists."""
        tree = {}
        for section, options in _SECTIONS.items():
            values = getattr(self, section)
            tree[section] = {name: list(getattr(values, name)) if options[name]["kind"] in ("fractions", "names")
                             else getattr(values, name) for name in options}
        return tree

    def describe(self) -> str:
        """A table of every key's effective value and where it came from (``--print-config``)."""
        sources = self.sources()
        rows = []
        for section, options in _SECTIONS.items():
            for name, option in options.items():
                value = getattr(getattr(self, section), name)
                rows.append((f"{section}.{name}", _show(option["kind"], value), sources[f"{section}.{name}"]))
        return format_table("memwarden configuration", ["key", "value", "source"], rows)


def _show(kind: str, value: Any) -> str:
    if value is None:
        return "none"
    if kind == "size":
        return format_bytes(value)
    if kind == "fractions":
        return ", ".join(f"{v:g}" for v in value)
    if kind == "names":
        return ", ".join(value) or "none"
    if kind == "bool":
        return str(value).lower()
    return str(value)


def _locate(section: str, name: str, source: str) -> str:
    """How an error names a key: after the variable, the file's table, or the override."""
    kind, _, detail = source.partition(" ")
    if kind == "env":
        return detail
    if kind == "file":
        return f"{detail} [{section}] {name}"
    return f"{kind} {section}.{name}"  # override, default, given


def _known(section: str, name: str, where: str) -> None:
    if name not in _SECTIONS[section]:
        raise ConfigError(f"{where}: unknown key {name!r} in [{section}]; expected one of "
                          f"{', '.join(_SECTIONS[section])}{_suggest(name, _SECTIONS[section])}")


_CLASSES = {f.name: f.default_factory for f in dataclasses.fields(MemwardenConfig) if f.name != "_sources"}
# section -> key -> {"kind", "optional", "check", "default"}
_SECTIONS = {section: {f.name: {**f.metadata, "default": f.default} for f in dataclasses.fields(cls)}
             for section, cls in _CLASSES.items()}
