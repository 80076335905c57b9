"""memwarden's pytest plugin: memory reset, leak checks, limits, tracking, isolation.

Loaded by the ``pytest11`` entry point after ``pip install memwarden`` (or with
``-p memwarden.testing.plugin`` / ``pytest_plugins = ["memwarden.testing.plugin"]``).
"""
from __future__ import annotations

import gc
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from . import _sources as src
from ._isolation import (IsolatedProcessError, PytestFailure, _ModuleFunction, spawn,
                         with_child_traceback)
from ._leak import DEFAULT_FAIL, DEFAULT_WARN, LeakChecker, LeakResult
from ._limits import PeakMonitor, PeakResult
from ._reset import reset_memory
from ._resources import GpuResources, InsufficientMemory
from ._tracker import MemoryTracker
from memwarden._units import format_bytes, parse_bytes

_STATE = pytest.StashKey["_State"]()
_CHECKER = pytest.StashKey[LeakChecker]()
_PEAK = pytest.StashKey[Any]()
_MARKS = pytest.StashKey[Any]()
_CHILD_REPR = pytest.StashKey[Any]()

MARKERS = {
    "leak_check": "leak_check(fail=None, warn=None, device=None, retries=None): check this test "
                  "for memory leaks (memwarden)",
    "no_leak_check": "no_leak_check: exempt this test from --memwarden-leak-check (memwarden)",
    "limit_memory": "limit_memory(limit, device=None): fail the test when its peak memory above "
                    "its start exceeds limit, e.g. '2 GiB' (memwarden)",
    "requires_memory": "requires_memory(size, device=None): skip unless the device has size free "
                       "(memwarden)",
    "isolated": "isolated(timeout=None): run the test in a fresh spawned Python process (memwarden)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("memwarden", "memwarden memory checks")
    g.addoption("--memwarden-leak-check", action="store_true", default=None,
                help="check every test for memory leaks (opt out with @pytest.mark.no_leak_check)")
    g.addoption("--memwarden-leak-fail", default=None, metavar="SIZE",
                help=f"growth that fails a test (default {format_bytes(DEFAULT_FAIL, digits=1)})")
    g.addoption("--memwarden-leak-warn", default=None, metavar="SIZE",
                help=f"growth that warns (default {format_bytes(DEFAULT_WARN, digits=1)})")
    g.addoption("--memwarden-leak-retries", default=None, metavar="N",
                help="re-measurements after a full cleanup before deciding (default 3)")
    g.addoption("--memwarden-device", default=None, metavar="DEV",
                help="device to measure: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    g.addoption("--memwarden-reset-each", action="store_true", default=None,
                help="run memwarden.testing.reset_memory() after every test")
    g.addoption("--memwarden-plots", default=None, choices=("failed", "always", "never"),
                help="when memory_tracker saves its plot: failed (default), always, never")
    g.addoption("--memwarden-plot-dir", default=None, metavar="DIR",
                help="where memory_tracker plots go (default .pytest_cache/d/memwarden-plots)")
    g.addoption("--memwarden-top", default=None, metavar="N",
                help="at the end, list the N tests with the highest memory peak (default 0: off)")
    parser.addini("memwarden_leak_check", "check every test for memory leaks", type="bool", default=False)
    parser.addini("memwarden_leak_fail", "growth that fails a leak check", default=format_bytes(DEFAULT_FAIL, digits=1))
    parser.addini("memwarden_leak_warn", "growth that warns in a leak check", default=format_bytes(DEFAULT_WARN, digits=1))
    parser.addini("memwarden_leak_retries", "re-measurements after cleanup", default="3")
    parser.addini("memwarden_leak_noisy", "what RSS/driver growth alone does: warn, fail or ignore",
                  default="warn")
    parser.addini("memwarden_device", "device to measure (auto, cpu, cuda, cuda:N)", default="auto")
    parser.addini("memwarden_tracker_interval", "memory_tracker sampling interval (s)", default="0.01")
    parser.addini("memwarden_plots", "when memory_tracker saves its plot", default="failed")
    parser.addini("memwarden_plot_dir", "where memory_tracker plots go", default="")
    parser.addini("memwarden_gc_freeze", "leak check: gc.freeze() the objects alive before the first "
                  "checked test so that each check scans only newer objects", type="bool", default=True)
    parser.addini("memwarden_gpu_budget", "capacity of gpu_resources per device (default: free memory)",
                  default="")
    parser.addini("memwarden_top", "list the N tests with the highest memory peak at the end", default="0")


_NO_OPTION = ("memwarden_leak_noisy", "memwarden_tracker_interval", "memwarden_gpu_budget",
              "memwarden_gc_freeze")


class _Values:
    """Reads a memwarden setting from its command-line option (when given) or its ini
    value, and turns a bad one into a :class:`pytest.UsageError` naming where it came from
    and the form expected (rather than an INTERNALERROR traceback)."""

    def __init__(self, config: pytest.Config):
        self.config = config

    def _get(self, name: str) -> tuple[Any, str]:
        if name not in _NO_OPTION:
            v = self.config.getoption(name)
            if v is not None:
                return v, "--" + name.replace("_", "-")
        try:
            v = self.config.getini(name)
        except (ValueError, pytest.UsageError) as e:   # e.g. a bool ini value pytest cannot read
            raise pytest.UsageError(f"ini option {name}: {e}; expected true or false") from None
        return v, f"ini option {name}"

    def raw(self, name: str) -> Any:
        return self._get(name)[0]

    @staticmethod
    def _bad(where: str, value: Any, expected: str, why: str = "") -> pytest.UsageError:
        shown = f"{where}={value}" if where.startswith("--") else f"{where} = {value}"
        return pytest.UsageError(f"{shown}: {why + '; ' if why else ''}expected {expected}")

    def size(self, name: str, optional: bool = False) -> int | None:
        v, where = self._get(name)
        if optional and (v is None or str(v).strip() == ""):
            return None
        try:
            return parse_bytes(v.strip() if isinstance(v, str) else v, name)
        except ValueError:
            raise self._bad(where, v, "a size with a unit, e.g. '48 MiB' or '2GiB'") from None

    def count(self, name: str) -> int:
        v, where = self._get(name)
        try:
            n = int(str(v).strip())
        except ValueError:
            n = -1
        if n < 0:
            raise self._bad(where, v, "an integer >= 0")
        return n

    def seconds(self, name: str) -> float:
        v, where = self._get(name)
        try:
            x = float(str(v).strip())
        except ValueError:
            x = float("nan")
        if not (0 < x < float("inf")):
            raise self._bad(where, v, "a number of seconds > 0, e.g. 0.01")
        return x

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        v, where = self._get(name)
        if v not in choices:
            raise self._bad(where, v, "one of " + ", ".join(choices))
        return v

    def flag(self, name: str) -> bool:
        return bool(self._get(name)[0])

    def device(self, name: str) -> str:
        v, where = self._get(name)
        dev = (v or "auto").strip() if isinstance(v, str) else (v or "auto")
        expected = "auto, cpu, cuda or cuda:N"
        try:
            resolved = src.resolve_device(dev)
        except (ValueError, TypeError):
            raise self._bad(where, v, expected, "not a device memwarden.testing measures") from None
        if src.device_type(resolved) == "cuda":
            shown = f"{where}={v}" if where.startswith("--") else f"{where} = {v}"
            if not src.cuda_available():
                raise pytest.UsageError(
                    f"{shown}: CUDA is not available (torch.cuda.is_available() is False), so "
                    "nothing would be checked; use --memwarden-device=cpu or auto")
            count = _cuda_device_count()
            index = int(resolved.split(":", 1)[1]) if ":" in resolved else 0
            if count is not None and index >= count:
                raise pytest.UsageError(f"{shown}: there is no {resolved}, only {count} CUDA device(s)")
        return dev


def _cuda_device_count() -> int | None:
    try:
        import torch
        return int(torch.cuda.device_count())
    except Exception:  # pragma: no cover
        return None


class _State:
    def __init__(self, config: pytest.Config):
        v = _Values(config)
        self.leak_all = bool(v.raw("memwarden_leak_check"))
        self.fail = v.size("memwarden_leak_fail")
        self.warn = v.size("memwarden_leak_warn")
        self.retries = v.count("memwarden_leak_retries")
        self.noisy = v.choice("memwarden_leak_noisy", ("warn", "fail", "ignore"))
        self.device = v.device("memwarden_device")
        self.reset_each = bool(config.getoption("memwarden_reset_each"))
        self.interval = v.seconds("memwarden_tracker_interval")
        self.plots = v.choice("memwarden_plots", ("failed", "always", "never"))
        self.plot_dir_opt = v.raw("memwarden_plot_dir")
        self.budget = v.size("memwarden_gpu_budget", optional=True)
        self.top = v.count("memwarden_top")
        self.config = config
        self.warnings: list[tuple[str, LeakResult]] = []
        self.leaks: list[tuple[str, LeakResult]] = []
        self.plots_saved: list[tuple[str, Path]] = []
        self.peaks: list[tuple[str, PeakResult]] = []
        self.resources: GpuResources | None = None
        self.gc_freeze = v.flag("memwarden_gc_freeze")
        self.frozen = False

    def plot_dir(self) -> Path:
        if self.plot_dir_opt:
            return Path(self.plot_dir_opt)
        cache = getattr(self.config, "cache", None)
        if cache is not None:
            return Path(cache.mkdir("memwarden-plots"))
        return Path(tempfile.mkdtemp(prefix="memwarden-plots-"))


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS.values():
        config.addinivalue_line("markers", line)
    config.stash[_STATE] = _State(config)


def _skip(reason: str):
    """Skip, reported at the test's location rather than inside this plugin."""
    try:
        raise pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # pragma: no cover - older pytest
        pytest.skip(reason)


def _state(config: pytest.Config) -> _State:
    return config.stash[_STATE]


# --- marker arguments --------------------------------------------------------------
class _BadMarker(Exception):
    pass


def _mark_call(mark: pytest.Mark) -> str:
    args = [repr(a) for a in mark.args] + [f"{k}={v!r}" for k, v in mark.kwargs.items()]
    return f"@pytest.mark.{mark.name}({', '.join(args)})"


def _mark_args(mark: pytest.Mark, positional: tuple[str, ...], allowed: tuple[str, ...],
               required: str | None = None, example: str = "") -> dict:
    if len(mark.args) > len(positional):
        raise _BadMarker(f"takes at most {len(positional)} positional argument(s), got {len(mark.args)}")
    kw = dict(zip(positional, mark.args))
    for k, v in mark.kwargs.items():
        if k in kw:
            raise _BadMarker(f"got {k!r} twice")
        if k not in allowed:
            raise _BadMarker(f"unexpected keyword argument {k!r} (accepted: {', '.join(allowed)})")
        kw[k] = v
    if required is not None and required not in kw:
        raise _BadMarker(f"needs a {required}, e.g. {example}")
    return kw


def _mark_size(value: Any, name: str) -> int:
    try:
        return parse_bytes(value, name)
    except ValueError as e:
        raise _BadMarker(str(e)) from None


def _mark_device(kw: dict, default: str) -> str:
    dev = kw.get("device")
    try:
        return src.resolve_device(dev if dev is not None else default)
    except (ValueError, TypeError) as e:
        raise _BadMarker(f"bad device {dev!r}: {e}") from None


def _parse_marks(item: pytest.Item) -> dict:
    """The arguments of the test's memwarden markers, checked and converted (cached)."""
    cached = item.stash.get(_MARKS, None)
    if cached is not None:
        return cached
    st = _state(item.config)
    out: dict[str, Any] = {"error": None}
    mark = None
    try:
        mark = item.get_closest_marker("limit_memory")
        if mark is not None:
            kw = _mark_args(mark, ("limit",), ("limit", "device"), "limit", "limit_memory('2 GiB')")
            out["limit_memory"] = {"limit": _mark_size(kw["limit"], "limit"),
                                   "device": _mark_device(kw, st.device)}
        mark = item.get_closest_marker("requires_memory")
        if mark is not None:
            kw = _mark_args(mark, ("size",), ("size", "device"), "size", "requires_memory('4 GiB')")
            out["requires_memory"] = {"size": _mark_size(kw["size"], "size"),
                                      "device": _mark_device(kw, st.device)}
        mark = item.get_closest_marker("leak_check")
        if mark is not None:
            kw = _mark_args(mark, (), ("fail", "warn", "device", "retries", "noisy"))
            lk: dict[str, Any] = {"device": _mark_device(kw, st.device)}
            if "fail" in kw:
                lk["fail"] = _mark_size(kw["fail"], "fail")
            if "warn" in kw:
                lk["warn"] = _mark_size(kw["warn"], "warn")
            if "retries" in kw:
                r = kw["retries"]
                if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                    raise _BadMarker(f"retries must be an int >= 0, got {r!r}")
                lk["retries"] = r
            if "noisy" in kw:
                if kw["noisy"] not in ("warn", "fail", "ignore"):
                    raise _BadMarker(f"noisy must be 'warn', 'fail' or 'ignore', got {kw['noisy']!r}")
                lk["noisy"] = kw["noisy"]
            out["leak_check"] = lk
        mark = item.get_closest_marker("isolated")
        if mark is not None:
            kw = _mark_args(mark, ("timeout",), ("timeout",))
            t = kw.get("timeout")
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
                raise _BadMarker(f"timeout must be a number of seconds > 0 or None, got {t!r}")
            out["isolated"] = {"timeout": t}
    except _BadMarker as e:
        out = {"error": f"{_mark_call(mark)}: {e}"}
    item.stash[_MARKS] = out
    return out


# --- leak check -------------------------------------------------------------------
def _leak_settings(item: pytest.Item) -> dict | None:
    st = _state(item.config)
    marks = _parse_marks(item)
    if marks["error"] is not None:   # reported by pytest_runtest_setup as this test's error
        return None
    mark = marks.get("leak_check")
    if item.get_closest_marker("no_leak_check") is not None:
        return None
    if not (st.leak_all or mark is not None or "leak_check" in getattr(item, "fixturenames", ())):
        return None
    kw = mark or {"device": src.resolve_device(st.device)}
    fail = kw.get("fail", st.fail)
    return {"device": kw["device"], "fail": fail, "warn": kw.get("warn", min(st.warn, fail)),
            "retries": kw.get("retries", st.retries), "noisy": kw.get("noisy", st.noisy)}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    settings = _leak_settings(item)
    if settings is None:
        return None
    from _pytest.runner import runtestprotocol
    st = _state(item.config)
    if st.gc_freeze and not st.frozen and hasattr(gc, "freeze") and gc.get_freeze_count() == 0:
        # Everything alive now (modules, torch, collected items) is moved out of the
        # collector's view once: each check's gc and tensor census then scan only the
        # objects created since, which makes them ~10x cheaper. Undone at unconfigure.
        gc.collect()
        gc.freeze()
        st.frozen = True
    checker = LeakChecker(label=item.name, **settings)
    item.stash[_CHECKER] = checker
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    checker.start()
    reports = runtestprotocol(item, nextitem=nextitem, log=False)
    if all(r.passed for r in reports) and len(reports) == 3:
        result = checker.check()
        call = reports[1]
        if result.verdict == "fail":
            call.outcome = "failed"
            call.longrepr = result.format()
            call.sections.append(("memwarden leak check", result.summary()))
            call.user_properties.append(("memwarden_leak_bytes", result.leaked))
            st.leaks.append((item.nodeid, result))
        elif result.verdict == "warn":
            call.sections.append(("memwarden leak check (warning)", result.format()))
            st.warnings.append((item.nodeid, result))
    for rep in reports:
        ihook.pytest_runtest_logreport(report=rep)
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    """Memory kept by a broader-scoped fixture first set up during a checked test is not
    that test's leak."""
    item = getattr(request, "_pyfuncitem", None)
    checker = item.stash.get(_CHECKER, None) if item is not None else None
    if checker is None or fixturedef.scope == "function" or checker.result is not None:
        return (yield)
    before = checker.read()
    try:
        return (yield)
    finally:
        after = checker.read()
        checker.exempt({k: after[k] - before[k] for k in after})
        checker._census_before |= set(checker._last_census)


@pytest.fixture
def leak_check(request) -> LeakChecker:
    """Check this test for leaks (measured around setup, call and teardown); returns the
    :class:`LeakChecker`, whose ``fail``/``warn`` thresholds can be changed in the test."""
    checker = request.node.stash.get(_CHECKER, None)
    if checker is None:  # e.g. also marked no_leak_check
        pytest.fail("leak_check is not active for this test (is it marked no_leak_check?)", pytrace=False)
    return checker


# --- reset -----------------------------------------------------------------------
@pytest.fixture
def memory_reset(request):
    """reset_memory() before and after the test; yields the report of the first."""
    dev = _state(request.config).device
    report = reset_memory(dev)
    yield report
    reset_memory(dev)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem) -> None:
    st = _state(item.config)
    if st.resources is not None:
        st.resources.release_owner(item.nodeid)
        st.resources.owner = None
    if st.reset_each:
        reset_memory(st.device)


# --- limits ----------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    st = _state(item.config)
    if st.resources is not None:
        st.resources.owner = item.nodeid
    marks = _parse_marks(item)
    if marks["error"] is not None:
        # like pytest's own "Error evaluating 'skipif'": this test errors, without a traceback
        pytest.fail(marks["error"], pytrace=False)
    req = marks.get("requires_memory")
    if req is None:
        return
    need, dev = req["size"], req["device"]
    if src.device_type(dev) == "cuda" and not src.cuda_available():
        _skip(f"requires {format_bytes(need, digits=1)} free on {dev}: CUDA is not available")
    free, total = src.free_and_total(dev)
    if free < need:
        _skip(f"requires {format_bytes(need, digits=1)} free on {dev}, only {format_bytes(free, digits=1)} of "
                    f"{format_bytes(total, digits=1)} free")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    st = _state(item.config)
    marks = _parse_marks(item)
    lim = marks.get("limit_memory")
    if (lim is None and st.top <= 0) or marks.get("isolated") is not None:
        return (yield)
    if lim is not None:
        limit, dev = lim["limit"], lim["device"]
        if src.device_type(dev) == "cuda" and not src.cuda_available():
            _skip(f"limit_memory on {dev}: CUDA is not available")
    else:
        limit, dev = None, src.resolve_device(st.device)
    mon = PeakMonitor(dev).start()
    try:
        return (yield)
    finally:
        item.stash[_PEAK] = (limit, mon.stop())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.when != "call":
        return report
    child = item.stash.get(_CHILD_REPR, None)
    if child is not None and report.failed:
        report.longrepr = child     # the isolated test's failure as the child saw it
    peak = item.stash.get(_PEAK, None)
    st = _state(item.config)
    if peak is not None and st.top > 0:
        st.peaks.append((item.nodeid, peak[1]))
    if peak is not None and peak[0] is not None and report.passed:
        limit, res = peak
        if res.peak > limit:
            report.outcome = "failed"
            report.longrepr = (f"memwarden limit_memory: {item.name} used more memory than its limit: "
                               + res.describe(limit))
        report.sections.append(("memwarden limit_memory", res.describe(limit)))
    tracker = getattr(item, "funcargs", {}).get("memory_tracker")
    if isinstance(tracker, MemoryTracker) and st.plots != "never" and (report.failed or st.plots == "always"):
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)[-150:]
        d = st.plot_dir()
        lines = []
        try:
            tracker.stop()     # the call is over: one set of samples, one analysis for all three
            an = tracker.analyze()
            data = tracker.to_dict(an)
            lines.append(f"samples: {tracker.to_json(d / f'{name}.json', data)}")
            with_plot = tracker.plot(d / f"{name}.png", title=item.nodeid, data=data)
            lines.insert(0, f"timeline plot: {with_plot}")
            st.plots_saved.append((item.nodeid, with_plot))
            report.user_properties.append(("memwarden_plot", str(with_plot)))
            lines.append(str(an))
        except Exception as e:  # a plot must never hide the test's own failure
            lines.append(f"could not save the memory plot: {type(e).__name__}: {e}")
        report.sections.append(("memwarden memory_tracker", "\n".join(lines)))
    return report


# --- tracker ---------------------------------------------------------------------
@pytest.fixture
def memory_tracker(request):
    """A started :class:`MemoryTracker`; its timeline plot is saved and its path attached to
    the report when the test fails (``--memwarden-plots=always`` for every test)."""
    st = _state(request.config)
    tr = MemoryTracker(st.device, interval=st.interval).start()
    yield tr
    tr.stop()


# --- isolation -------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    mark = pyfuncitem.get_closest_marker("isolated")
    if mark is None:
        return None
    fn = pyfuncitem.obj
    func = getattr(fn, "__func__", fn)
    mod = pyfuncitem.module
    target = _ModuleFunction(mod.__name__, getattr(mod, "__file__", None), func.__qualname__,
                             rewrite_asserts=True)
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {a: pyfuncitem.funcargs[a] for a in names}
    if getattr(fn, "__self__", None) is not None:
        target = _BoundTest(target)
    iso = _parse_marks(pyfuncitem).get("isolated") or {}
    pyfuncitem.stash[_CHILD_REPR] = None
    try:
        kind, value, tb, rendered = spawn(target, (), kwargs, timeout=iso.get("timeout"),
                                          render=_failure_renderer(pyfuncitem))
    except IsolatedProcessError as e:   # a crash or timeout: its message is the whole story
        pyfuncitem.stash[_CHILD_REPR] = str(e)
        raise
    if kind == "error":
        pyfuncitem.stash[_CHILD_REPR] = rendered     # the report (see makereport)
        raise value if rendered is not None else with_child_traceback(value, tb)
    return True


def _failure_renderer(item: pytest.Function) -> PytestFailure | None:
    """What formats an isolated test's failure in the child as pytest would here (None with
    --fulltrace, which shows the parent's frames as well)."""
    config = item.config
    if config.getoption("fulltrace", False):
        return None
    import inspect
    code = inspect.unwrap(getattr(item.obj, "__func__", item.obj)).__code__
    try:
        abspath = Path.cwd() != config.invocation_params.dir
    except OSError:
        abspath = True
    return PytestFailure(code.co_filename, code.co_firstlineno - 1,   # pytest's Code counts from 0
                         style=config.getoption("tbstyle", "auto"),
                         showlocals=bool(config.getoption("showlocals", False)),
                         verbosity=config.get_verbosity(), abspath=abspath)


class _BoundTest:
    """A test method: the child builds a fresh instance of its class."""

    def __init__(self, target: _ModuleFunction):
        self.target = target
        self.qualname = target.qualname

    def __call__(self, **kwargs):
        cls_name, meth = self.target.qualname.rsplit(".", 1)
        cls = _ModuleFunction(self.target.module, self.target.path, cls_name,
                               self.target.rewrite_asserts).resolve()
        return getattr(cls(), meth)(**kwargs)

    def __str__(self) -> str:  # used in error messages
        return self.qualname


# --- resources -------------------------------------------------------------------
class _FixtureResources(GpuResources):
    def reserve(self, size, device=None, *, skip: bool = True):
        """Reserve ``size`` for the current test; skips the test when it does not fit
        (``skip=False`` raises :class:`InsufficientMemory` instead). Released at teardown."""
        try:
            return super().reserve(size, device)
        except InsufficientMemory as e:
            if skip:
                pytest.skip(str(e))
            raise


@pytest.fixture(scope="session")
def gpu_resources(request) -> GpuResources:
    """Session-wide memory budgets: ``gpu_resources.reserve("4 GiB")`` in a test."""
    st = _state(request.config)
    st.resources = _FixtureResources(capacity=st.budget, default_device=st.device)
    item = getattr(request, "_pyfuncitem", None)
    st.resources.owner = item.nodeid if item is not None else None
    return st.resources


def pytest_unconfigure(config: pytest.Config) -> None:
    st = config.stash.get(_STATE, None)
    if st is not None and st.frozen:
        gc.unfreeze()
        st.frozen = False


def pytest_report_header(config: pytest.Config) -> str | None:
    st = _state(config)
    if not st.leak_all:
        return None
    return (f"memwarden: leak check on (device {st.device}, fail {format_bytes(st.fail, digits=1)}, "
            f"warn {format_bytes(st.warn, digits=1)}, retries {st.retries})")


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    st = config.stash.get(_STATE, None)
    if st is None:
        return
    tr = terminalreporter
    if st.leaks or st.warnings or st.plots_saved:
        tr.write_sep("=", "memwarden memory report")
        for nodeid, r in st.leaks:
            tr.write_line(f"LEAK  {nodeid}: {r.summary()}")
        for nodeid, r in st.warnings:
            tr.write_line(f"WARN  {nodeid}: {r.summary()}")
        for nodeid, p in st.plots_saved:
            tr.write_line(f"PLOT  {nodeid}: {p}")
    if st.top > 0 and st.peaks:
        _top_table(tr, st)


def _top_table(tr, st: _State) -> None:
    """The ``--memwarden-top=N`` table: the tests with the highest peak above their start
    (measured around the call phase; isolated tests run elsewhere and are not in it)."""
    top = sorted(st.peaks, key=lambda p: p[1].peak, reverse=True)[:st.top]
    tr.write_sep("=", f"memwarden: top {len(top)} of {len(st.peaks)} tests by memory peak")
    rows = [(format_bytes(r.peak, digits=1), r.device, r.source + ("" if r.exact else " (sampled)"), nodeid)
            for nodeid, r in top]
    head = ("peak", "device", "source", "test")
    w = [max(len(x[i]) for x in rows + [head]) for i in range(3)]
    tr.write_line(f"{head[0]:>{w[0]}}  {head[1]:<{w[1]}}  {head[2]:<{w[2]}}  {head[3]}")
    for peak, dev, source, nodeid in rows:
        tr.write_line(f"{peak:>{w[0]}}  {dev:<{w[1]}}  {source:<{w[2]}}  {nodeid}")
